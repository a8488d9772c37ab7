/**
 * One QEMU `microvm` process per VM, as the rest of the library sees it once it runs: its agent
 * connection, pause/resume, capture, stop and kill, and what it left when it failed. How it is
 * spawned and started is ./pending.ts's; its command line ./argv.ts's; migration streams
 * ./migration.ts's; the process registry that kills every QEMU with its owner ./processes.ts's.
 * When a KVM boot fails, the engine falls back to TCG for this and later VMs.
 */
import type { ChildProcess } from "node:child_process";
import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import type { AgentClient, HelloInfo } from "../agent/client.js";
import { logger } from "../debug.js";
import { phaseSince, phasesOn, processCpuMs, reportPhase } from "../phases.js";
import { EngineError } from "../errors.js";
import type { SystemUser } from "../private.js";
import { type Accel, chooseAccel, markKvmBroken } from "./accel.js";
import { validateSpec, type VmSpec } from "./argv.js";
import { nativeArtifacts } from "./artifacts.js";
import { describeFailure } from "./console.js";
import { migrateToFile } from "./migration.js";
import { helloAsNewVm, PendingVm, type VmExit } from "./pending.js";
import type { QmpCallOptions, QmpClient } from "./qmp.js";

export { AGENT_PORT_NAME, EXEC_PORT_NAME, kernelCmdline, QEMU_FDS, qemuArgs, type VmSpec } from "./argv.js";
export { helloAsNewVm, isRestoreFault, PendingVm, type VmExit } from "./pending.js";
export { engineCounters } from "./processes.js";
export { qemuBinary, qemuIdentity } from "./qemu-binary.js";

const log = logger("engine");

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
    const pending = await PendingVm.spawn(spec, accel, kernel, initramfs, MicroVm.adopt);
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
    const pending = await PendingVm.spawn(spec, accel, artifacts.kernel, artifacts.initramfs, MicroVm.adopt);
    pending.idle();
    return pending;
  }

  /** @internal Wires up a VM whose agent has answered. */
  static adopt(this: void, p: PendingVm, agent: AgentClient, qmp: QmpClient, hello: HelloInfo, bootMs: number, id: string): MicroVm {
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
    if (!this.exitInfo) {
      let t0: number | undefined;
      if (phasesOn()) {
        const cpu = processCpuMs(this.proc.pid);
        if (cpu !== undefined) reportPhase("qemu.cpu_life", cpu);
        t0 = performance.now();
      }
      this.proc.kill("SIGKILL");
      if (t0 !== undefined) void this.exited.then(() => phaseSince("engine.kill", t0));
    }
    return this.exited;
  }
}
