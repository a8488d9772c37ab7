/**
 * A QEMU process on its way to being a VM: spawned under `setpriv` (confined as ./confine.ts
 * describes, its files handed over as descriptors), its QMP and agent channels connected back to
 * sockets this process listens on (so nothing polls for QEMU's sockets to appear), and then
 * started: the snapshot's state restored, or the boot awaited, until the agent's first answer.
 * A restore can stop before the start (`-incoming defer`: a pool's spare). Every failure kills
 * the process, keeps its console log and throws the most telling error.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes, randomUUID } from "node:crypto";
import { chmodSync, chownSync, closeSync, constants, existsSync, mkdtempSync, openSync, rmSync, statSync } from "node:fs";
import type { Socket } from "node:net";
import { join } from "node:path";
import { AgentClient, type HelloInfo } from "../agent/client.js";
import { logger } from "../debug.js";
import { EngineError } from "../errors.js";
import { keepLog, logPathFor } from "../failure-logs.js";
import { runtimeRoot } from "../paths.js";
import { phaseSince, phasesOn, processCpuMs, reportPhase } from "../phases.js";
import { hostDifferences, hostMismatch } from "../schema/host.js";
import type { Accel } from "./accel.js";
import { kernelCmdline, qemuArgs, type VmSpec } from "./argv.js";
import { checkConfined, checkRuntimeRoot, confinement, type Confinement, grantQemu, setprivArgs } from "./confine.js";
import { describeFailure, failureHint, STDERR_TAIL } from "./console.js";
import { hostIdentity } from "./identity.js";
import { acceptOnce, listening, restoreState, shareSocket, sleep } from "./migration.js";
import { installExitHook, registerProcess, RUN_DIR_PREFIX, unregisterProcess } from "./processes.js";
import { qemuBinary } from "./qemu-binary.js";
import { QmpClient } from "./qmp.js";
import type { MicroVm } from "./qemu.js";

const log = logger("engine");

export interface VmExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Exit requested by us (stop/kill), as opposed to a crash or a guest-side poweroff. */
  expected: boolean;
}

/** Makes the running VM of a started process (MicroVm.adopt). */
export type Adopt = (p: PendingVm, agent: AgentClient, qmp: QmpClient, hello: HelloInfo, bootMs: number, id: string) => MicroVm;

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

/** How long a restored guest may stay silent once QEMU complained about the state it loaded. */
const COMPLAINT_GRACE_MS = 5_000;
/** QEMU run states of a guest that will never answer (query-status). */
const BROKEN_STATES = new Set(["guest-panicked", "internal-error", "shutdown", "io-error"]);
/** Signals of a QEMU that crashed on what it loaded (as opposed to one killed from outside). */
const CRASH_SIGNALS = new Set<string>(["SIGABRT", "SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGTRAP"]);

/** Whether `err` is a restore that failed because of the snapshot loaded (not the host, not a deadline). */
export const isRestoreFault = (err: unknown): boolean => err instanceof EngineError && err.code === "ENGINE_RESTORE_FAILED";

/**
 * ENGINE_RESTORE_FAILED: the restore failed because of what was loaded (QEMU refused or crashed on
 * the state, or the restored guest is broken), which callers count against the snapshot.
 */
function restoreFailed(message: string, cause: unknown): EngineError {
  return new EngineError("ENGINE_RESTORE_FAILED", message, {
    hint: "the snapshot is corrupt or was made by another QEMU, kernel or agent; bake it again (supermachine verify --restore --fix finds and quarantines such snapshots)",
    cause,
  });
}

/**
 * A QEMU process that has been spawned and has connected its QMP and agent channels, but whose
 * guest has not been started (restore) or has not answered yet (boot).
 */
export class PendingVm {
  stderr = "";
  /** How many writes of QEMU's to stderr said more than warnings (the tail above is bounded). */
  private stderrComplaints = 0;
  owner: MicroVm | undefined;
  expected = false;
  readonly exited: Promise<VmExit>;
  private readonly spawnError: Promise<never>;
  private readonly earlyExit: Promise<never>;
  private used = false;
  /** Set once start() began loading a snapshot's state: a failure from then on may be the snapshot's. */
  private loading = false;
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
    /** Makes the running VM once its agent answered (MicroVm.adopt). */
    private readonly adopt: Adopt,
    private readonly closeListeners: () => void,
    private readonly channels: { agent: Promise<Socket>; qmp: Promise<Socket> },
  ) {
    const qemu = qemuBinary();
    proc.stderr!.setEncoding("utf8");
    proc.stderr!.on("data", (d: string) => {
      this.stderr = (this.stderr + d).slice(-STDERR_TAIL);
      // QEMU's warnings ("qemu-system-x86_64: warning: ...") are not complaints about a state.
      if (d.split("\n").some((l) => l.trim() && !l.includes("warning:"))) this.stderrComplaints++;
    });
    this.exited = new Promise<VmExit>((resolve) => {
      const done = (code: number | null, signal: NodeJS.Signals | null) => {
        unregisterProcess(proc);
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

  static async spawn(spec: VmSpec, accel: Accel, kernel: string, initramfs: string, adopt: Adopt): Promise<PendingVm> {
    if (!existsSync(spec.rootfs)) {
      throw new EngineError("ENGINE_ROOTFS_MISSING", `root filesystem image ${spec.rootfs} does not exist`);
    }
    // This host as QEMU will be: a restore of a snapshot made on another one stops here.
    const host = hostIdentity(accel);
    const diffs = spec.capturedBy ? hostDifferences(spec.capturedBy.engine, host) : [];
    if (diffs.length) throw hostMismatch(spec.capturedBy!.what, diffs);
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
        machine: host.machine,
        cpu: host.cpu,
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
    registerProcess(proc, runDir);
    const [q, a] = [qmpL, agentL];
    const p = new PendingVm(spec, proc, runDir, consoleLog, accel, conf, t0, adopt, () => {
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
    phaseSince("engine.spawn", t0);
    if (phasesOn()) {
      const cpu = processCpuMs(proc.pid);
      if (cpu !== undefined) reportPhase("qemu.cpu_at_spawn", cpu);
    }
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
    this.loading = this.spec.incomingState !== undefined;
    this.proc.ref();
    const t0 = performance.now();
    return this.guard(this.spec.bootTimeoutMs ?? 60_000, async (race) => {
      const agent = this.agent!;
      const qmp = this.qmp!;
      const mark = this.stderrComplaints;
      if (this.spec.incomingState !== undefined) {
        await race(restoreState(qmp, this.runDir, this.spec.incomingState, !this.spec.incomingHasRam));
        phaseSince("engine.restore", t0);
      }
      const tHello = performance.now();
      // After a restore, HELLO also gives the clone the host's clock, fresh entropy and an
      // identity of its own, before anything else runs in it. A QEMU that complained about the
      // state it loaded (virtqueue indices that do not match the RAM) gives a guest that rarely
      // answers: it gets a short grace rather than the whole deadline.
      const complaint = this.spec.incomingState !== undefined ? this.complaintDeadline(mark) : undefined;
      let answered: Awaited<ReturnType<typeof helloAsNewVm>>;
      try {
        answered = await race(complaint ? Promise.race([helloAsNewVm(agent), complaint.promise]) : helloAsNewVm(agent));
      } finally {
        complaint?.cancel();
      }
      const { hello, id } = answered;
      phaseSince("engine.hello", tHello);
      if (phasesOn()) {
        const cpu = processCpuMs(this.proc.pid);
        if (cpu !== undefined) reportPhase("qemu.cpu_to_ready", cpu);
      }
      // A boot is timed from the process spawn; a restore from the state load (the process may
      // have been waiting, pre-started).
      const bootMs = performance.now() - (this.spec.incomingState !== undefined ? t0 : this.t0);
      return this.adopt(this, agent, qmp, hello, bootMs, id);
    });
  }


  /**
   * @internal Loads the snapshot's state and lets the guest run, without a word to its agent
   * (no HELLO, no exec): QEMU restored as it would be by hand, with the same arguments. The
   * density benchmark's peer (`plain_qemu_idle_pss_mib`); `kill()` ends it.
   */
  async loadOnly(): Promise<void> {
    if (this.used) throw new EngineError("ENGINE_PENDING_USED", "this pre-started VM was already started");
    if (this.spec.incomingState === undefined) throw new EngineError("ENGINE_PRESTART_NEEDS_STATE", "loadOnly needs a snapshot's state (VmSpec.incomingState)");
    this.used = true;
    this.loading = true;
    await this.guard(this.spec.bootTimeoutMs ?? 60_000, (race) => race(restoreState(this.qmp!, this.runDir, this.spec.incomingState!, !this.spec.incomingHasRam)));
  }

  /**
   * Rejects COMPLAINT_GRACE_MS after QEMU first writes an error to stderr past `mark` (while a
   * restored guest is awaited): QEMU reports no error on a sound restore.
   */
  private complaintDeadline(mark: number): { promise: Promise<never>; cancel: () => void } {
    let poll: NodeJS.Timeout | undefined;
    let grace: NodeJS.Timeout | undefined;
    const promise = new Promise<never>((_, reject) => {
      poll = setInterval(() => {
        if (this.stderrComplaints === mark || grace) return;
        clearInterval(poll);
        grace = setTimeout(() => {
          const said = this.stderr.trim().split("\n").slice(-3).join("; ");
          reject(restoreFailed(`restoring ${this.spec.incomingState} failed: the guest did not answer within ${COMPLAINT_GRACE_MS} ms of QEMU reporting: ${said}`, undefined));
        }, COMPLAINT_GRACE_MS);
      }, 100);
    });
    promise.catch(() => {});
    return {
      promise,
      cancel: () => {
        clearInterval(poll);
        clearTimeout(grace);
      },
    };
  }

  /** QEMU's run state (`running`, `guest-panicked`, ...), or undefined when QMP does not tell within a second. */
  private async vmStatus(): Promise<string | undefined> {
    const qmp = this.qmp;
    if (!qmp) return undefined;
    const ac = new AbortController();
    const t = setTimeout(() => ac.abort(), 1_000);
    try {
      return (await qmp.execute<{ status?: string }>("query-status", undefined, { signal: ac.signal })).status;
    } catch {
      return undefined;
    } finally {
      clearTimeout(t);
    }
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
    // The owner gave up on this VM (a pool shutting down): it goes at once, leaving no log.
    const signal = this.spec.signal;
    let onAbort: (() => void) | undefined;
    const aborted = new Promise<never>((_, reject) => {
      if (!signal) return;
      onAbort = () => reject(signal.reason instanceof Error ? signal.reason : new EngineError("ENGINE_BOOT_TIMEOUT", "the VM's start was aborted"));
      if (signal.aborted) onAbort();
      else signal.addEventListener("abort", onAbort, { once: true });
    });
    aborted.catch(() => {});
    const race = <U,>(p: Promise<U>) => Promise.race([p, this.spawnError, this.earlyExit, timeout, aborted]);
    try {
      return await fn(race);
    } catch (err) {
      if (signal?.aborted) {
        this.expected = true;
        this.proc.kill("SIGKILL");
        await this.exited;
        rmSync(this.runDir, { recursive: true, force: true });
        throw err;
      }
      // A broken channel is usually the symptom of QEMU exiting: if it exits within a moment,
      // its own error (with stderr) is the one worth reporting.
      const exitErr = await Promise.race([this.earlyExit.catch((e: unknown) => e), sleep(1_000).then(() => undefined)]);
      // A restored guest that stays silent: what QEMU says of it tells a bad snapshot from a slow host.
      const silent = this.loading && !(exitErr instanceof EngineError) && err instanceof EngineError && err.code === "ENGINE_BOOT_TIMEOUT" ? await this.vmStatus() : undefined;
      this.expected = true;
      this.proc.kill("SIGKILL");
      const exit = await this.exited;
      this.keepConsoleLog();
      rmSync(this.runDir, { recursive: true, force: true });
      if (!this.loading) throw exitErr instanceof EngineError ? exitErr : err;
      const state = this.spec.incomingState!;
      if (exitErr instanceof EngineError) {
        // Killed from outside (the OOM killer, an operator): the host's doing, not the snapshot's.
        if (exit.signal && !CRASH_SIGNALS.has(exit.signal)) throw exitErr;
        throw restoreFailed(`restoring ${state} failed: ${exitErr.message}`, err);
      }
      if (silent !== undefined) {
        const complaint = this.stderrComplaints > 0 ? `QEMU reported: ${this.stderr.trim().split("\n").slice(-3).join("; ")}` : `the VM is ${silent}`;
        if (this.stderrComplaints > 0 || BROKEN_STATES.has(silent)) throw restoreFailed(`restoring ${state} failed: ${(err as Error).message.split("\n")[0]} after its state was loaded; ${complaint}`, err);
      }
      throw err;
    } finally {
      clearTimeout(timer);
      if (onAbort) signal?.removeEventListener("abort", onAbort);
    }
  }
}
