/**
 * One QEMU `microvm` process per VM. The process connects back to two unix sockets we listen
 * on (QMP and the agent's virtio-serial port), so nothing polls for QEMU's sockets to appear.
 * QEMU runs under `setpriv --pdeathsig KILL`, so it dies with the Node process that started
 * it, even when that process is SIGKILLed; it is confined as `./confine.ts` describes (seccomp
 * sandbox, an unprivileged user when we are root, its files handed over as descriptors).
 * Migration streams (captures, restores) go through unix sockets to and from this process,
 * which reads and writes the state files: QEMU never opens them, and never spawns a helper.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { randomBytes, randomUUID } from "node:crypto";
import { chmodSync, chownSync, closeSync, constants, createReadStream, createWriteStream, existsSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { connect, createServer, type Server, type Socket } from "node:net";
import { totalmem } from "node:os";
import { basename, join } from "node:path";
import { pipeline } from "node:stream/promises";
import { AgentClient, type HelloInfo } from "../agent/client.js";
import { EngineError, OptionError } from "../errors.js";
import { logger } from "../debug.js";
import { keepLog, logPathFor } from "../failure-logs.js";
import { runtimeRoot } from "../paths.js";
import type { SystemUser } from "../private.js";
import { type Accel, chooseAccel, markKvmBroken } from "./accel.js";
import { nativeArtifacts } from "./artifacts.js";
import { checkConfined, checkRuntimeRoot, confinement, type Confinement, grantQemu, SANDBOX_OPTS, setprivArgs } from "./confine.js";
import { QmpClient, type QmpCallOptions } from "./qmp.js";
import { pidAlive } from "../process.js";

const log = logger("engine");

/**
 * Identity of the QEMU in use, for snapshot keys: a snapshot is restored only by the QEMU that
 * made it. It is what the binary says of itself (`QEMU emulator version 7.2.19 (Debian
 * 1:7.2+dfsg-7+deb12u16)`), so the same package on another machine has the same identity: keys
 * must not depend on paths or mtimes. Memoised per binary name.
 */
const qemuIds = new Map<string, string>();
export function qemuIdentity(): string {
  const name = qemuBinary();
  let id = qemuIds.get(name);
  if (id === undefined) {
    const r = spawnSync(name, ["--version"], { encoding: "utf8", timeout: 10_000 });
    const line = r.status === 0 ? r.stdout.split("\n")[0]?.trim() : undefined;
    id = line || `${basename(name)}:missing`;
    qemuIds.set(name, id);
  }
  return id;
}

/** The QEMU binary; `SUPERMACHINE_QEMU` overrides (read at every launch). */
export const qemuBinary = (): string => process.env.SUPERMACHINE_QEMU || "qemu-system-x86_64";
export const AGENT_PORT_NAME = "supermachine.0";
/** The second agent port, for clients of the user's (`vm.execPath`). */
export const EXEC_PORT_NAME = "supermachine.1";
const STDERR_TAIL = 8 * 1024;

export interface VmSpec {
  /** Squashfs image attached read-only as the guest's root lower layer. */
  rootfs: string;
  memoryMib: number;
  vcpus: number;
  /** Deadline for the agent's first answer. */
  bootTimeoutMs?: number;
  /** Forces an accelerator (tests, benchmarks); default: `chooseAccel()`. */
  accel?: Accel;
  /** Extra kernel command-line words (debugging). */
  extraCmdline?: string[];
  /**
   * Guest RAM in a file instead of anonymous memory. `shared: true` writes guest memory to the
   * file (a VM that will be snapshotted); `false` maps it copy-on-write (a VM restored from a
   * snapshot: every restore shares the file's untouched pages, writes stay private).
   */
  memoryFile?: { path: string; shared: boolean };
  /** Restore: start paused and load this device-state file (QEMU migration stream) first. */
  incomingState?: string;
  /** The state file is a complete stream with the RAM in it (`snapshot({ includeRam })`). */
  incomingHasRam?: boolean;
}

export interface VmExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Exit requested by us (stop/kill), as opposed to a crash or a guest-side poweroff. */
  expected: boolean;
}

/**
 * Every QEMU process alive in this Node process, with its runtime directory. On `exit` the
 * processes are killed and the directories removed, synchronously.
 */
const live = new Map<ChildProcess, string>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const [p, dir] of live) {
      try {
        p.kill("SIGKILL");
      } catch {
        /* already gone */
      }
      rmSync(dir, { recursive: true, force: true });
    }
  });
  sweepStaleRunDirs();
}

const RUN_DIR_PREFIX = "sm-";
/** `sm-<owner pid>-<random>`: the owner's pid lets a later process tell an orphan. */
const RUN_DIR_RE = /^sm-(\d+)-[A-Za-z0-9]{6}$/;

/**
 * Removes runtime directories left by processes that died without cleaning up (SIGKILL):
 * their QEMU processes died with them (pdeathsig), only the directory stayed.
 */
function sweepStaleRunDirs(): void {
  const root = runtimeRoot();
  let names: string[];
  try {
    names = readdirSync(root);
  } catch {
    return;
  }
  for (const name of names) {
    const m = RUN_DIR_RE.exec(name);
    if (!m || Number(m[1]) === process.pid || pidAlive(Number(m[1]))) continue;
    rmSync(join(root, name), { recursive: true, force: true });
    log("removed stale runtime directory %s", name);
  }
}


let launched = 0;

/** QEMU processes this Node process owns now, and has started in all. */
export function engineCounters(): { live: number; launched: number } {
  return { live: live.size, launched };
}

function validateSpec(spec: VmSpec): void {
  // Guest RAM is committed lazily, but a guest larger than the host makes no sense, and with
  // file-backed RAM a huge size would become a huge file.
  const hostMib = Math.floor(totalmem() / (1024 * 1024));
  if (!Number.isInteger(spec.memoryMib) || spec.memoryMib < 64 || spec.memoryMib > hostMib) {
    throw new OptionError("OPTION_MEMORY_INVALID", `memoryMib ${spec.memoryMib} is not an integer between 64 and this host's ${hostMib} MiB`, {
      hint: "pass memoryMib in MiB, for example 256",
    });
  }
  if (!Number.isInteger(spec.vcpus) || spec.vcpus < 1 || spec.vcpus > 255) {
    throw new OptionError("OPTION_VCPUS_INVALID", `vcpus ${spec.vcpus} is not an integer between 1 and 255`);
  }
}

/** Kernel command line. `quiet` keeps the emulated UART (slow under TCG) out of the boot path. */
export function kernelCmdline(accel: Accel, vcpus: number, extra: string[] = []): string {
  return [
    "console=ttyS0",
    "quiet",
    "panic=-1",
    "reboot=t",
    "tsc=reliable",
    "no_timer_check",
    "noreplace-smp",
    // Skips the local APIC timer calibration (~300 ms under TCG; KVM calibrates quickly). Only
    // with one vCPU: secondary CPUs would be left without high-resolution timers.
    ...(accel === "tcg" && vcpus === 1 ? ["nolapic_timer"] : []),
    "random.trust_cpu=on",
    "sm.root=/dev/vda",
    `sm.port=${AGENT_PORT_NAME}`,
    `sm.exec_port=${EXEC_PORT_NAME}`,
    ...extra,
  ].join(" ");
}

/**
 * The descriptors a QEMU process inherits, by their number in it (3 and up: `spawnStdio`). The
 * kernel, initramfs and RAM file are reopened through /proc/self/fd (QEMU opens them by path);
 * the root disk and the console log go through fd sets, which QEMU dups without reopening.
 */
export const QEMU_FDS = { kernel: 3, initramfs: 4, rootfs: 5, console: 6, memory: 7 } as const;
const FDSET = { rootfs: 1, console: 2 } as const;

export function qemuArgs(o: {
  accel: Accel;
  memoryMib: number;
  vcpus: number;
  qmpSock: string;
  agentSock: string;
  /** Unix socket QEMU listens on for the exec port. */
  execSock: string;
  cmdline: string;
  /** RAM in the file passed as QEMU_FDS.memory: written through (shared) or copy-on-write. */
  memoryFile?: { shared: boolean };
  incoming?: boolean;
  /** `-sandbox` (SANDBOX_OPTS); false only when unsandboxed. */
  sandbox: boolean;
}): string[] {
  // The PIT, PIC and RTC stay: without the PIT the guest cannot calibrate its TSC under TCG,
  // without the PIC it hangs early, without the RTC it stalls a second and starts in 1970.
  const machine = "microvm,acpi=off,x-option-roms=off" + (o.memoryFile ? ",memory-backend=mem" : "");
  const memory = o.memoryFile
    ? [
        "-object",
        `memory-backend-file,id=mem,size=${o.memoryMib}M,mem-path=/proc/self/fd/${QEMU_FDS.memory},share=${o.memoryFile.shared ? "on" : "off"}`,
      ]
    : [];
  return [
    ...(o.sandbox ? ["-sandbox", SANDBOX_OPTS] : []),
    ...memory,
    ...(o.incoming ? ["-incoming", "defer"] : []),
    "-M", machine,
    "-accel", o.accel === "kvm" ? "kvm" : "tcg",
    "-cpu", o.accel === "kvm" ? "host" : "max",
    "-m", String(o.memoryMib),
    "-smp", String(o.vcpus),
    "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
    "-kernel", `/proc/self/fd/${QEMU_FDS.kernel}`,
    "-initrd", `/proc/self/fd/${QEMU_FDS.initramfs}`,
    "-append", o.cmdline,
    "-add-fd", `fd=${QEMU_FDS.console},set=${FDSET.console}`,
    "-serial", `file:/dev/fdset/${FDSET.console}`,
    "-add-fd", `fd=${QEMU_FDS.rootfs},set=${FDSET.rootfs}`,
    "-drive", `id=root,file=/dev/fdset/${FDSET.rootfs},format=raw,if=none,readonly=on`,
    "-device", "virtio-blk-device,drive=root",
    "-device", "virtio-rng-device",
    "-device", "virtio-serial-device,max_ports=3",
    "-chardev", `socket,id=agent,path=${o.agentSock},server=off`,
    "-device", `virtserialport,chardev=agent,name=${AGENT_PORT_NAME}`,
    "-chardev", `socket,id=exec,path=${o.execSock},server=on,wait=off`,
    "-device", `virtserialport,chardev=exec,name=${EXEC_PORT_NAME}`,
    "-chardev", `socket,id=qmp,path=${o.qmpSock},server=off`,
    "-mon", "chardev=qmp,mode=control",
  ];
}

/**
 * Lets QEMU's user connect to a socket this process listens on (root's sockets are 0755), and
 * nobody else: its group, 0660. Nothing to do when QEMU runs as this process's user.
 */
function shareSocket(path: string, user: SystemUser | undefined): void {
  if (!user) return;
  chownSync(path, -1, user.gid);
  chmodSync(path, 0o660);
}

/** Accept exactly one connection on a fresh unix socket. */
function acceptOnce(path: string): { server: Server; conn: Promise<Socket> } {
  const server = createServer();
  const conn = new Promise<Socket>((resolve, reject) => {
    server.once("connection", (s) => {
      server.close();
      resolve(s);
    });
    server.once("error", reject);
  });
  conn.catch(() => {});
  server.listen(path);
  return { server, conn };
}

/**
 * HELLO as a new VM, on every boot, restore and handoff: the host's clock, fresh entropy (the
 * guest mixes it in and reseeds its RNG) and a new VM id, from which the guest also draws a new
 * boot_id (PROTOCOL.md, HELLO). VMs restored from one snapshot start with the same RAM: this is
 * what makes them differ before anyone runs anything in them. Throws if the guest did not take
 * the id.
 */
export async function helloAsNewVm(agent: AgentClient, opts: { timeoutMs?: number } = {}): Promise<{ hello: HelloInfo; id: string }> {
  const id = randomUUID();
  const hello = await agent.hello({ entropy: randomBytes(64), vmId: id, ...opts });
  if (hello.vmId !== id) {
    throw new EngineError("ENGINE_IDENTITY_FAILED", `the guest agent did not take the new VM id ${id} (it answered ${hello.vmId ?? "without one"})`, {
      hint: "the VM's console log says why; without a new identity it would share boot_id with other VMs of its snapshot",
    });
  }
  return { hello, id };
}

export class MicroVm {
  readonly exited: Promise<VmExit>;
  private exitInfo: VmExit | undefined;
  private stopping = false;
  /** The VM died or its agent channel broke, without anyone asking: its console log is kept. */
  private failing = false;
  private vmId: string;

  private constructor(
    private readonly proc: ChildProcess,
    private readonly pending: PendingVm,
    readonly runDir: string,
    readonly consoleLog: string,
    readonly accel: Accel,
    readonly agent: AgentClient,
    private readonly qmp: QmpClient,
    readonly hello: HelloInfo,
    /** Milliseconds from process spawn to the agent's HELLO_OK. */
    readonly bootMs: number,
    exited: Promise<VmExit>,
    id: string,
  ) {
    this.vmId = id;
    this.exited = exited;
    void exited.then((e) => (this.exitInfo = e));
  }

  get pid(): number {
    return this.proc.pid ?? -1;
  }

  /** This VM's id, also in the guest at /run/supermachine/vm-id (a new one per restore). */
  get id(): string {
    return this.vmId;
  }

  /**
   * Makes this running VM a new one to the guest (fresh entropy, a new VM id and boot_id): for
   * the VM a bake captured, which goes on running as a pool's VM (warm handoff).
   */
  async renewIdentity(timeoutMs = 10_000): Promise<void> {
    this.vmId = (await helloAsNewVm(this.agent, { timeoutMs })).id;
  }

  get alive(): boolean {
    return this.exitInfo === undefined && !this.agent.dead;
  }

  /**
   * Like `alive`, but also catches a process that died so recently that Node has not reaped it
   * yet (a zombie): reads /proc, so it costs a few microseconds. Used before handing a VM out.
   */
  get aliveNow(): boolean {
    if (!this.alive) return false;
    try {
      const stat = readFileSync(`/proc/${this.proc.pid}/stat`, "latin1");
      return stat.charAt(stat.lastIndexOf(")") + 2) !== "Z";
    } catch {
      return false;
    }
  }

  /** Boot a VM and wait until its agent answers. */
  static async launch(spec: VmSpec): Promise<MicroVm> {
    validateSpec(spec);
    const artifacts = nativeArtifacts();
    const choice = spec.accel ? { accel: spec.accel, forced: true, reason: "requested" } : chooseAccel();
    try {
      return await MicroVm.launchWith(spec, choice.accel, artifacts.kernel, artifacts.initramfs);
    } catch (err) {
      if (choice.accel === "kvm" && !choice.forced && err instanceof EngineError) {
        markKvmBroken(err.message.split("\n")[0] ?? "boot failed");
        log("KVM boot failed, falling back to TCG: %s", err.message);
        return MicroVm.launchWith(spec, "tcg", artifacts.kernel, artifacts.initramfs);
      }
      throw err;
    }
  }

  private static async launchWith(spec: VmSpec, accel: Accel, kernel: string, initramfs: string): Promise<MicroVm> {
    const pending = await PendingVm.spawn(spec, accel, kernel, initramfs);
    return pending.start();
  }

  /**
   * Starts a QEMU process for a restore of `spec.incomingState` and stops there: the process
   * waits (`-incoming defer`) with its channels connected, so that `start()` later costs only
   * the state load and the agent's first answer, not the process start.
   */
  static async prestart(spec: VmSpec): Promise<PendingVm> {
    validateSpec(spec);
    if (spec.incomingState === undefined) {
      throw new EngineError("ENGINE_PRESTART_NEEDS_STATE", "only restores can be pre-started (VmSpec.incomingState is missing)");
    }
    const artifacts = nativeArtifacts();
    const accel = spec.accel ?? chooseAccel().accel;
    const pending = await PendingVm.spawn(spec, accel, artifacts.kernel, artifacts.initramfs);
    pending.idle();
    return pending;
  }

  /** @internal Wires up a VM whose agent has answered. */
  static adopt(p: PendingVm, agent: AgentClient, qmp: QmpClient, hello: HelloInfo, bootMs: number, id: string): MicroVm {
    const vm = new MicroVm(p.proc, p, p.runDir, p.consoleLog, p.accel, agent, qmp, hello, bootMs, p.exited, id);
    p.owner = vm;
    void p.exited.then((e) => vm.onExit(e, p.stderr));
    agent.on("fatal", (err: Error) => {
      if (!vm.stopping) {
        log("vm %d: agent connection failed (%s); killing the VM", p.proc.pid, err.message);
        vm.failing = true;
        void vm.kill();
      }
    });
    // An idle VM must not keep the owner's event loop alive (the exit hook kills it).
    p.idle();
    log("vm %d ready in %s ms (accel %s, agent %s)", p.proc.pid, bootMs.toFixed(1), p.accel, hello.agentVersion);
    return vm;
  }

  /** @internal */
  get isStopping(): boolean {
    return this.stopping;
  }

  /**
   * Where the guest console log of this VM was kept (`<home>/logs`, 0600) once it failed (its
   * process exited or its agent channel broke without anyone asking); undefined otherwise. The
   * log is written before its path is returned: an error never names a log that is not there.
   */
  get failureLog(): string | undefined {
    if (this.pending.keptLog) return this.pending.keptLog;
    if (this.alive || (this.stopping && !this.failing)) return undefined;
    return this.pending.keepConsoleLog();
  }

  /** The user QEMU runs as, when not this process's own. */
  get qemuUser(): SystemUser | undefined {
    return this.pending.confinement.user;
  }

  private onExit(e: VmExit, stderr: string): void {
    const failed = this.failing || (!e.expected && !this.stopping);
    this.failing = failed;
    let kept: string | undefined;
    if (failed) {
      kept = this.pending.keepConsoleLog();
      log("vm %d exited unexpectedly (%o); console log kept at %s", this.pid, e, kept);
    }
    this.agent.close(
      new EngineError("ENGINE_VM_EXITED", `the VM (QEMU pid ${this.pid}) has exited` + (failed ? describeFailure(stderr, kept) : "")),
    );
    this.qmp.close();
    rmSync(this.runDir, { recursive: true, force: true });
  }

  /**
   * Orderly stop: the agent powers the guest off; if QEMU is still there after `graceMs`, QMP
   * `quit`, and SIGKILL after as long again. Resolves when QEMU has exited.
   */
  async stop(graceMs = 2_000): Promise<VmExit> {
    if (this.exitInfo) return this.exitInfo;
    this.stopping = true;
    this.proc.ref();
    try {
      this.agent.shutdown();
    } catch {
      /* channel already dead: QMP or SIGKILL below */
    }
    const quit = setTimeout(() => void this.qmp.execute("quit").catch(() => {}), graceMs);
    const kill = setTimeout(() => this.proc.kill("SIGKILL"), 2 * graceMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(quit);
      clearTimeout(kill);
    }
  }

  /** The unix socket on which QEMU serves the exec port (PROTOCOL.md, for clients of the user's). */
  get execPath(): string {
    return join(this.runDir, "exec.sock");
  }

  /** Stops the guest's vCPUs (QMP `stop`). */
  async pause(opts: QmpCallOptions = {}): Promise<void> {
    await this.qmp.execute("stop", undefined, opts);
  }

  /** Lets a paused guest run again (QMP `cont`). */
  async resume(opts: QmpCallOptions = {}): Promise<void> {
    await this.qmp.execute("cont", undefined, opts);
  }

  /**
   * Captures the VM: pauses it and writes its device state to `stateFile` through QEMU
   * migration. With file-backed shared memory (`memoryFile.shared`), the guest RAM is already
   * in its file and is not copied (`x-ignore-shared`); `includeRam` writes a complete stream
   * instead (for a VM whose RAM is in no file of its own). The VM stays paused: one that shares
   * its RAM file with a snapshot must not run again, the caller kills it or hands it off.
   */
  async capture(stateFile: string, opts: { includeRam?: boolean } & QmpCallOptions = {}): Promise<{ durationMs: number }> {
    const t0 = performance.now();
    const q = { ...(opts.signal ? { signal: opts.signal } : {}) };
    await this.qmp.execute("stop", undefined, q);
    await this.qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "x-ignore-shared", state: !opts.includeRam }] }, q);
    await migrateToFile(this.qmp, this.runDir, this.qemuUser, stateFile, q);
    return { durationMs: performance.now() - t0 };
  }

  /** Immediate SIGKILL. Resolves when QEMU has exited. */
  kill(): Promise<VmExit> {
    this.stopping = true;
    // Whoever awaits the exit needs the event loop to stay up until it arrives.
    this.proc.ref();
    if (!this.exitInfo) this.proc.kill("SIGKILL");
    return this.exited;
  }
}

/**
 * A QEMU process that has been spawned and has connected its QMP and agent channels, but whose
 * guest has not been started (restore) or has not answered yet (boot).
 */
export class PendingVm {
  stderr = "";
  owner: MicroVm | undefined;
  expected = false;
  readonly exited: Promise<VmExit>;
  private readonly spawnError: Promise<never>;
  private readonly earlyExit: Promise<never>;
  private used = false;
  /** Set once the console log was kept there. */
  keptLog: string | undefined;

  private constructor(
    readonly spec: VmSpec,
    readonly proc: ChildProcess,
    readonly runDir: string,
    readonly consoleLog: string,
    readonly accel: Accel,
    readonly confinement: Confinement,
    readonly t0: number,
    private readonly closeListeners: () => void,
    private readonly channels: { agent: Promise<Socket>; qmp: Promise<Socket> },
  ) {
    const qemu = qemuBinary();
    proc.stderr!.setEncoding("utf8");
    proc.stderr!.on("data", (d: string) => {
      this.stderr = (this.stderr + d).slice(-STDERR_TAIL);
    });
    this.exited = new Promise<VmExit>((resolve) => {
      const done = (code: number | null, signal: NodeJS.Signals | null) => {
        live.delete(proc);
        this.closeListeners();
        resolve({ code, signal, expected: this.expected || (this.owner?.isStopping ?? false) });
      };
      proc.once("exit", done);
      proc.once("error", () => done(null, null));
    });
    this.spawnError = new Promise<never>((_, reject) => {
      proc.once("error", (e: NodeJS.ErrnoException) =>
        reject(
          new EngineError("ENGINE_SPAWN_FAILED", `could not start setpriv for ${qemu}: ${e.message}`, {
            hint: e.code === "ENOENT" ? "install QEMU (Debian package qemu-system-x86) and util-linux (setpriv), or run npx supermachine setup" : undefined,
          }),
        ),
      );
    });
    this.spawnError.catch(() => {});
    this.earlyExit = this.exited.then((e) => {
      // Kept now, before the run dir goes: a death nobody asked for, before the VM was handed
      // over (after that, MicroVm.onExit keeps it).
      const kept = e.expected || this.owner ? undefined : this.keepConsoleLog();
      throw new EngineError(
        "ENGINE_EXITED_DURING_BOOT",
        `QEMU exited during boot (${e.signal ? `signal ${e.signal}` : `code ${e.code}`})` + describeFailure(this.stderr, kept),
        { hint: failureHint(this.stderr) },
      );
    });
    this.earlyExit.catch(() => {});
  }

  agent: AgentClient | undefined;
  qmp: QmpClient | undefined;

  static async spawn(spec: VmSpec, accel: Accel, kernel: string, initramfs: string): Promise<PendingVm> {
    if (!existsSync(spec.rootfs)) {
      throw new EngineError("ENGINE_ROOTFS_MISSING", `root filesystem image ${spec.rootfs} does not exist`);
    }
    installExitHook();
    const qemu = qemuBinary();
    const conf = await confinement(qemu);
    checkRuntimeRoot(runtimeRoot(), conf.user);
    const runDir = mkdtempSync(join(runtimeRoot(), `${RUN_DIR_PREFIX}${process.pid}-`));
    const qmpSock = join(runDir, "qmp.sock");
    const agentSock = join(runDir, "agent.sock");
    const execSock = join(runDir, "exec.sock");
    const consoleLog = join(runDir, "console.log");
    // QEMU's files, opened here and inherited (QEMU_FDS order); closed here once it has them.
    const fds: number[] = [];
    let qmpL: ReturnType<typeof acceptOnce> | undefined;
    let agentL: ReturnType<typeof acceptOnce> | undefined;
    let proc: ChildProcess;
    let args: string[];
    const t0 = performance.now();
    try {
      // QEMU's user creates its exec socket (and a restore's incoming socket) here, and
      // connects to ours: the directory is shared with its group, nobody else.
      if (conf.user) {
        chownSync(runDir, -1, conf.user.gid);
        chmodSync(runDir, 0o770);
      }
      const take = (path: string, flags: number | string, mode?: number) => {
        const fd = openSync(path, flags, mode);
        fds.push(fd);
        return fd;
      };
      grantQemu(take(kernel, "r"), kernel, conf.user, "r");
      grantQemu(take(initramfs, "r"), initramfs, conf.user, "r");
      take(spec.rootfs, "r");
      take(consoleLog, "w", 0o600);
      if (spec.memoryFile) {
        // A bake's RAM file may not exist yet: QEMU sizes an empty file itself.
        const path = spec.memoryFile.path;
        grantQemu(take(path, constants.O_RDWR | constants.O_CREAT, 0o600), path, conf.user, "rw");
      }
      qmpL = acceptOnce(qmpSock);
      agentL = acceptOnce(agentSock);
      args = qemuArgs({
        accel,
        memoryMib: spec.memoryMib,
        vcpus: spec.vcpus,
        qmpSock,
        agentSock,
        execSock,
        cmdline: kernelCmdline(accel, spec.vcpus, spec.extraCmdline),
        ...(spec.memoryFile ? { memoryFile: { shared: spec.memoryFile.shared } } : {}),
        incoming: spec.incomingState !== undefined,
        sandbox: conf.sandbox,
      });
      await Promise.all([listening(qmpL.server), listening(agentL.server)]);
      shareSocket(qmpSock, conf.user);
      shareSocket(agentSock, conf.user);
      log("spawn %s %s", qemu, args.join(" "));
      proc = spawn("setpriv", [...setprivArgs(conf, accel === "kvm"), "--", qemu, ...args], { stdio: ["ignore", "ignore", "pipe", ...fds] });
    } catch (err) {
      qmpL?.server.close();
      agentL?.server.close();
      rmSync(runDir, { recursive: true, force: true });
      throw err;
    } finally {
      for (const fd of fds) closeSync(fd);
    }
    live.set(proc, runDir);
    launched++;
    const [q, a] = [qmpL, agentL];
    const p = new PendingVm(spec, proc, runDir, consoleLog, accel, conf, t0, () => {
      q.server.close();
      a.server.close();
    }, { agent: a.conn, qmp: q.conn });
    await p.guard(spec.bootTimeoutMs ?? 60_000, async (race) => {
      p.agent = new AgentClient(await race(p.channels.agent));
      p.qmp = new QmpClient(await race(p.channels.qmp));
      // QEMU set its sandbox up before it connected its character devices: it must be on now.
      const wrong = checkConfined(proc.pid!, conf);
      if (wrong) {
        throw new EngineError("ENGINE_SANDBOX_INACTIVE", `QEMU (pid ${proc.pid}) is not confined as it should be: ${wrong}`, {
          hint: "report this with the output of supermachine info; SUPERMACHINE_UNSANDBOXED=1 runs VMs without the sandbox",
        });
      }
    });
    return p;
  }

  /**
   * Keeps the console log under `<home>/logs` (once); returns where, or undefined when QEMU
   * wrote nothing to it (it never ran) or it could not be kept.
   */
  keepConsoleLog(): string | undefined {
    if (this.keptLog) return this.keptLog;
    try {
      if (statSync(this.consoleLog).size === 0) return undefined;
    } catch {
      return undefined;
    }
    const kept = keepLog(logPathFor("vm"), { copyFrom: this.consoleLog });
    if (kept) this.keptLog = kept;
    return kept;
  }

  /** Lets the owner's program exit while this process waits (the exit hook kills it). */
  idle(): void {
    this.proc.unref();
    (this.proc.stderr as unknown as { unref?: () => void }).unref?.();
    this.qmp?.unref();
    this.agent?.settle();
  }

  /** Restores the state (if any), waits for the agent's HELLO_OK and returns the running VM. */
  async start(): Promise<MicroVm> {
    if (this.used) throw new EngineError("ENGINE_PENDING_USED", "this pre-started VM was already started");
    this.used = true;
    this.proc.ref();
    const t0 = performance.now();
    return this.guard(this.spec.bootTimeoutMs ?? 60_000, async (race) => {
      const agent = this.agent!;
      const qmp = this.qmp!;
      if (this.spec.incomingState !== undefined) await race(restoreState(qmp, this.runDir, this.spec.incomingState, !this.spec.incomingHasRam));
      // After a restore, HELLO also gives the clone the host's clock, fresh entropy and an
      // identity of its own, before anything else runs in it.
      const { hello, id } = await race(helloAsNewVm(agent));
      // A boot is timed from the process spawn; a restore from the state load (the process may
      // have been waiting, pre-started).
      const bootMs = performance.now() - (this.spec.incomingState !== undefined ? t0 : this.t0);
      return MicroVm.adopt(this, agent, qmp, hello, bootMs, id);
    });
  }


  /** Kills a process that will not be used. */
  async kill(): Promise<void> {
    this.expected = true;
    this.proc.ref();
    this.proc.kill("SIGKILL");
    await this.exited;
    rmSync(this.runDir, { recursive: true, force: true });
  }

  /**
   * Runs `fn` racing QEMU's death and a deadline. On failure the process is killed, its console
   * log kept, and the most telling error thrown: QEMU's own (with its stderr) when it died.
   */
  private async guard<T>(timeoutMs: number, fn: (race: <U>(p: Promise<U>) => Promise<U>) => Promise<T>): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            new EngineError(
              "ENGINE_BOOT_TIMEOUT",
              `the guest agent did not answer within ${timeoutMs} ms (accel ${this.accel})` + describeFailure(this.stderr, this.keepConsoleLog()),
            ),
          ),
        timeoutMs,
      );
    });
    timeout.catch(() => {});
    const race = <U,>(p: Promise<U>) => Promise.race([p, this.spawnError, this.earlyExit, timeout]);
    try {
      return await fn(race);
    } catch (err) {
      // A broken channel is usually the symptom of QEMU exiting: if it exits within a moment,
      // its own error (with stderr) is the one worth reporting.
      const exitErr = await Promise.race([this.earlyExit.catch((e: unknown) => e), sleep(1_000).then(() => undefined)]);
      this.expected = true;
      this.proc.kill("SIGKILL");
      await this.exited;
      this.keepConsoleLog();
      rmSync(this.runDir, { recursive: true, force: true });
      if (!(exitErr instanceof EngineError)) throw err;
      if (this.spec.incomingState === undefined) throw exitErr;
      throw new EngineError("ENGINE_RESTORE_FAILED", `restoring ${this.spec.incomingState} failed: ${exitErr.message}`, {
        hint: "the snapshot is corrupt or was made by another QEMU, kernel or agent; bake it again",
        cause: err,
      });
    } finally {
      clearTimeout(timer);
    }
  }
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Polls `query-migrate` until the migration completed (or failed: an EngineError). */
async function waitMigration(qmp: QmpClient, what: string, opts: QmpCallOptions = {}): Promise<void> {
  for (let delay = 1; ; delay = Math.min(delay * 2, 20)) {
    opts.signal?.throwIfAborted();
    const st = await qmp.execute<{ status?: string; "error-desc"?: string }>("query-migrate", undefined, opts);
    if (st.status === "completed") return;
    if (st.status === "failed" || st.status === "cancelled") {
      throw new EngineError("ENGINE_MIGRATION_FAILED", `${what} failed: ${st["error-desc"] ?? st.status}`);
    }
    await sleep(delay);
  }
}

/**
 * Has QEMU migrate to a unix socket this process listens on, and writes what arrives to
 * `stateFile` (0600). Resolves once the migration completed and the file is complete.
 */
async function migrateToFile(qmp: QmpClient, runDir: string, user: SystemUser | undefined, stateFile: string, opts: QmpCallOptions): Promise<void> {
  const sock = join(runDir, `migrate-${randomBytes(4).toString("hex")}.sock`);
  const server = createServer();
  const written = new Promise<void>((resolve, reject) => {
    server.once("connection", (conn) => {
      server.close();
      pipeline(conn, createWriteStream(stateFile, { mode: 0o600 })).then(resolve, reject);
    });
    server.once("error", reject);
  });
  written.catch(() => {});
  try {
    server.listen(sock);
    await listening(server);
    shareSocket(sock, user);
    await qmp.execute("migrate", { uri: `unix:${sock}` }, opts);
    await waitMigration(qmp, "snapshot", opts);
    // QEMU closes the stream once the migration completed: the file is whole when it ends.
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        written,
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new EngineError("ENGINE_MIGRATION_FAILED", `snapshot: QEMU did not close the migration stream to ${stateFile}`)), 30_000);
        }),
      ]);
    } finally {
      clearTimeout(timer);
    }
  } finally {
    server.close();
    rmSync(sock, { force: true });
  }
}

/**
 * Loads a device-state file into a QEMU started with `-incoming defer`, then resumes it. QEMU
 * listens on a unix socket in the run directory; this process streams the file into it.
 */
async function restoreState(qmp: QmpClient, runDir: string, stateFile: string, ignoreShared: boolean): Promise<void> {
  await qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "x-ignore-shared", state: ignoreShared }] });
  const sock = join(runDir, "incoming.sock");
  await qmp.execute("migrate-incoming", { uri: `unix:${sock}` });
  // QEMU listens by the time migrate-incoming answers. A stream that breaks (QEMU rejected the
  // state and closed) is reported by the migration status below.
  const conn = connect(sock);
  const sent = pipeline(createReadStream(stateFile), conn).catch((e: Error) => log("streaming %s into QEMU: %s", stateFile, e.message));
  try {
    for (let delay = 1; ; delay = Math.min(delay * 2, 10)) {
      const st = await qmp.execute<{ status?: string }>("query-status");
      if (st.status === "paused" || st.status === "running") break;
      if (st.status === "inmigrate") {
        await sleep(delay);
        continue;
      }
      throw new EngineError("ENGINE_RESTORE_FAILED", `restoring ${stateFile} left the VM in state ${JSON.stringify(st.status)}`);
    }
    await waitIncoming(qmp, stateFile);
  } finally {
    conn.destroy();
    await sent;
  }
  await qmp.execute("cont");
}

async function waitIncoming(qmp: QmpClient, stateFile: string): Promise<void> {
  for (let delay = 1; ; delay = Math.min(delay * 2, 10)) {
    const st = await qmp.execute<{ status?: string; "error-desc"?: string }>("query-migrate");
    if (st.status === undefined || st.status === "completed") return;
    if (st.status === "failed") {
      throw new EngineError("ENGINE_RESTORE_FAILED", `restoring ${stateFile} failed: ${st["error-desc"] ?? "migration failed"}`, {
        hint: "the snapshot is corrupt or was made by another QEMU, kernel or agent; bake it again",
      });
    }
    await sleep(delay);
  }
}

function listening(server: Server): Promise<void> {
  return server.listening ? Promise.resolve() : new Promise((res, rej) => {
    server.once("listening", () => res());
    server.once("error", rej);
  });
}

/** QEMU's last stderr lines, and the kept console log when there is one (never a path that does not exist). */
function describeFailure(stderr: string, keptLog: string | undefined): string {
  const tail = stderr.trim().split("\n").slice(-10).join("\n");
  return (tail ? `\nQEMU stderr:\n${tail}` : "") + (keptLog ? `\nguest console log: ${keptLog}` : "");
}

function failureHint(stderr: string): string | undefined {
  if (/failed to execute/.test(stderr)) return "install QEMU (Debian package qemu-system-x86, or run npx supermachine setup) or point SUPERMACHINE_QEMU at it";
  if (/memory|ram size|cannot set up guest memory/i.test(stderr)) return "lower memoryMib or free host memory";
  if (/kvm/i.test(stderr)) return "set SUPERMACHINE_ACCEL=tcg to use software emulation";
  return undefined;
}
