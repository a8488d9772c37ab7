/**
 * `Vm`: a VM checked out of a pool. Runs processes and moves files through the guest agent.
 */
import { resolve as resolvePath } from "node:path";
import type { AgentClient, ExecRequest, ExitInfo } from "../agent/client.js";
import { captureRunning, type SnapshotMeta } from "../store/snapshots.js";
import { Image } from "./image.js";
import { AgentError, OptionError, PoolError, SupermachineError } from "../errors.js";
import type { MicroVm } from "../engine/qemu.js";
import type { ImageConfig } from "../image/oci-layout.js";
import { FILE_LIMIT, resolveExecOptions, type ExecOptions, type ExecOutput } from "./options.js";

/** Output a collect-mode exec keeps per stream before it kills the process. */
const MAX_COLLECT = 64 * 1024 * 1024;
const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

export class ExecError extends SupermachineError {}

/** What a Vm needs to know about its image to run processes as the image says. */
export interface ExecDefaults {
  /** KEY=VALUE list from the image config, plus build-time `env`. */
  env: string[];
  workingDir: string | undefined;
  user: string | undefined;
}

export function execDefaults(config: ImageConfig, buildEnv: Record<string, string>): ExecDefaults {
  return {
    env: mergeEnv(config.env, buildEnv),
    workingDir: config.workingDir || undefined,
    user: config.user || undefined,
  };
}

/** Later keys win; a PATH is always present so argv[0] lookup works. */
export function mergeEnv(base: string[], extra: Record<string, string>): string[] {
  const map = new Map<string, string>();
  for (const kv of base) {
    const i = kv.indexOf("=");
    if (i > 0) map.set(kv.slice(0, i), kv.slice(i + 1));
  }
  for (const [k, v] of Object.entries(extra)) map.set(k, v);
  if (!map.has("PATH")) map.set("PATH", DEFAULT_PATH);
  return [...map].map(([k, v]) => `${k}=${v}`);
}

type ReleaseFn = (vm: Vm) => Promise<void>;

/**
 * Resolves an image `User` (`name`, `uid`, `name:group`, `uid:gid`) to numeric ids, reading the
 * guest's /etc/passwd and /etc/group when names are involved.
 */
export async function resolveImageUser(agent: AgentClient, spec: string): Promise<{ uid: number; gid: number }> {
  const [u, g] = spec.split(":", 2) as [string, string | undefined];
  let uid = /^\d+$/.test(u) ? Number(u) : undefined;
  let gid = g !== undefined && /^\d+$/.test(g) ? Number(g) : undefined;
  if (uid === undefined || gid === undefined) {
    const passwd = (await agent.readFile("/etc/passwd", 1 << 20).catch(() => Buffer.alloc(0))).toString();
    for (const line of passwd.split("\n")) {
      const f = line.split(":");
      if (f.length < 4) continue;
      if (uid === undefined ? f[0] === u : Number(f[2]) === uid) {
        uid = Number(f[2]);
        if (g === undefined) gid = Number(f[3]);
        break;
      }
    }
    if (uid !== undefined && g === undefined && gid === undefined) gid = uid;
    if (g !== undefined && gid === undefined) {
      const group = (await agent.readFile("/etc/group", 1 << 20).catch(() => Buffer.alloc(0))).toString();
      const found = group.split("\n").map((l) => l.split(":")).find((f) => f[0] === g)?.[2];
      gid = found === undefined ? undefined : Number(found);
    }
  }
  if (uid === undefined || gid === undefined || Number.isNaN(uid) || Number.isNaN(gid)) {
    throw new ExecError("EXEC_USER_UNKNOWN", `the image's User ${JSON.stringify(spec)} is not in the guest's /etc/passwd or /etc/group`);
  }
  return { uid, gid };
}

export class Vm {
  private released = false;
  private user: { uid: number; gid: number } | undefined;

  /** @internal */
  constructor(
    /** @internal */ readonly machine: MicroVm,
    private readonly defaults: ExecDefaults,
    private readonly releaseTo: ReleaseFn,
    private readonly origin?: SnapshotMeta,
  ) {}

  /** Path of the unix socket the agent channel runs on (diagnostics; it is already connected). */
  get vsockPath(): string {
    return `${this.machine.runDir}/agent.sock`;
  }
  get execPath(): string {
    return this.vsockPath;
  }
  /** Host pid of the QEMU process. */
  get pid(): number {
    return this.machine.pid;
  }
  /** "kvm" or "tcg". */
  get accel(): string {
    return this.machine.accel;
  }

  private usable(what: string): void {
    if (this.released) throw new PoolError("VM_RELEASED", `${what}: this VM was released back to its pool`, { hint: "acquire a new VM" });
    if (!this.machine.alive) {
      throw new PoolError("VM_DEAD", `${what}: the VM (QEMU pid ${this.machine.pid}) is no longer running`, {
        hint: "release it and acquire another; the pool replaces dead VMs",
      });
    }
  }

  private async resolveUser(): Promise<{ uid: number; gid: number } | undefined> {
    if (!this.defaults.user) return undefined;
    this.user ??= await resolveImageUser(this.machine.agent, this.defaults.user);
    return this.user;
  }

  /** Sends a signal (e.g. 15 for SIGTERM) to the image's workload, the VM's main process. */
  async workloadSignal(signum: number): Promise<void> {
    this.usable("vm.workloadSignal");
    if (!Number.isInteger(signum) || signum < 1 || signum > 64) {
      throw new OptionError("OPTION_INVALID", `vm.workloadSignal: signum ${JSON.stringify(signum)} must be an integer from 1 to 64`);
    }
    await this.machine.agent.signalWorkload(signum).catch((e: unknown) => {
      throw new ExecError("EXEC_NO_WORKLOAD", `vm.workloadSignal(${signum}): ${(e as Error).message}`, {
        cause: e,
        hint: "the image has no workload running (no ENTRYPOINT/CMD, or it exited)",
      });
    });
  }

  /** Run a process to completion and collect its output. */
  async exec(options: ExecOptions): Promise<ExecOutput> {
    this.usable("vm.exec");
    const o = resolveExecOptions(options);
    o.signal?.throwIfAborted();
    await Promise.all(o.files.map((f) => this.machine.agent.writeFile(f.path, f.bytes, { mode: f.mode })));
    const base: Omit<ExecRequest, "argv"> = {
      env: mergeEnv(this.defaults.env, o.env),
      cwd: o.cwd ?? this.defaults.workingDir ?? "/",
      timeoutMs: o.timeoutMs,
      ...(await this.resolveUser()),
    };
    const first = await this.collect({ ...base, argv: o.argv }, o.signal);
    if (!o.chain || first.exitCode !== 0) return first;
    const second = await this.collect({ ...base, argv: o.chain }, o.signal);
    return {
      stdout: Buffer.concat([first.stdout, second.stdout]),
      stderr: Buffer.concat([first.stderr, second.stderr]),
      exitCode: second.exitCode,
    };
  }

  private async collect(req: ExecRequest, signal: AbortSignal | undefined): Promise<ExecOutput> {
    const stream = this.machine.agent.exec(req);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let outLen = 0;
    let errLen = 0;
    let overflow = false;
    stream.onStdout = (c) => {
      outLen += c.length;
      if (outLen > MAX_COLLECT) return void (overflow ||= (stream.cancel(), true));
      out.push(c);
    };
    stream.onStderr = (c) => {
      errLen += c.length;
      if (errLen > MAX_COLLECT) return void (overflow ||= (stream.cancel(), true));
      err.push(c);
    };
    const onAbort = () => stream.cancel();
    signal?.addEventListener("abort", onAbort, { once: true });
    let exit: ExitInfo;
    try {
      exit = await stream.wait();
    } catch (e) {
      throw this.explain(e, req.argv);
    } finally {
      signal?.removeEventListener("abort", onAbort);
    }
    if (signal?.aborted) throw signal.reason;
    if (overflow) {
      throw new ExecError("EXEC_OUTPUT_LIMIT", `${req.argv[0]} wrote more than ${MAX_COLLECT} bytes on one stream; it was killed`, {
        hint: "redirect large output to a file and read it with vm.readFile, or use a streaming API",
      });
    }
    return { stdout: Buffer.concat(out), stderr: Buffer.concat(err), exitCode: exit.exitCode };
  }

  private explain(e: unknown, argv: string[]): Error {
    if (!this.machine.alive) {
      return new PoolError("VM_DEAD", `exec ${JSON.stringify(argv[0])}: the VM (QEMU pid ${this.machine.pid}) died`, { cause: e });
    }
    return e instanceof Error ? e : new AgentError("AGENT_UNKNOWN", String(e));
  }

  /** Write a file in the guest (mode 0644, parents created). At most 4 MiB. */
  async writeFile(path: string, bytes: Buffer): Promise<void> {
    this.usable("vm.writeFile");
    if (typeof path !== "string" || !path.startsWith("/")) throw new OptionError("OPTION_INVALID", `vm.writeFile: path ${JSON.stringify(path)} must be absolute`);
    if (bytes.length > FILE_LIMIT) throw new OptionError("OPTION_FILE_TOO_LARGE", `vm.writeFile: ${bytes.length} bytes is over the ${FILE_LIMIT}-byte limit`);
    await this.machine.agent.writeFile(path, Buffer.from(bytes));
  }

  /** Read a file from the guest. At most 4 MiB. */
  async readFile(path: string): Promise<Buffer> {
    this.usable("vm.readFile");
    if (typeof path !== "string" || !path.startsWith("/")) throw new OptionError("OPTION_INVALID", `vm.readFile: path ${JSON.stringify(path)} must be absolute`);
    return this.machine.agent.readFile(path, FILE_LIMIT);
  }

  /**
   * Captures this VM as it is now (files, processes, memory) into `destDir` and returns it as an
   * Image whose pools restore that state. The VM pauses for the capture and then goes on.
   */
  async snapshot(destDir: string): Promise<Image> {
    this.usable("vm.snapshot");
    if (typeof destDir !== "string" || destDir === "") throw new OptionError("OPTION_INVALID", "vm.snapshot: destDir must be a directory path");
    if (!this.origin) {
      throw new ExecError("EXEC_SNAPSHOT_UNSUPPORTED", "vm.snapshot: this VM was not restored from a snapshot (its pool boots cold)", {
        hint: "use a pool with the image's own memoryMib and vcpus",
      });
    }
    const snap = await captureRunning(this.machine, resolvePath(destDir), this.origin);
    return new Image(snap);
  }

  /** Return the VM to its pool. Idempotent. */
  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    await this.releaseTo(this);
  }

  dispose(): Promise<void> {
    return this.release();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.release();
  }

  /** For `using vm = ...` (synchronous disposal): the release runs in the background. */
  [Symbol.dispose](): void {
    this.release().catch(() => {});
  }
}
