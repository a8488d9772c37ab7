/**
 * `Pool`: keeps `min` VMs ready, at most `max` alive, and serves `acquire()` callers in
 * arrival order. A fresh VM is a restore of the image's snapshot. The pool keeps one restore
 * done ahead of time (a spare: QEMU started, snapshot loaded, first process start done, so
 * that the emulator has translated the guest's exec path), which makes a new VM cost about as
 * much as handing out an idle one. `restoreOnRelease: true` (the default) throws a released VM
 * away and restores a clean one in its place; `false` hands the same VM, as it was left, to the
 * next caller.
 */
import { setMaxListeners } from "node:events";
import { PoolError } from "../errors.js";
import { logger } from "../debug.js";
import { phaseSince } from "../phases.js";
import { isRestoreFault, MicroVm, type VmSpec } from "../engine/qemu.js";
import { startWorkload } from "../bake/workload.js";
import type { ExecDefaults } from "../session/env.js";
import type { ResolvedPool } from "../schema/options.js";
import type { SnapshotMeta, WorkloadSpec } from "../store/snapshots.js";
import { Vm, type VmOrigin } from "./vm.js";

const log = logger("pool");
/** How long a release waits for the guest to kill what the caller left running. */
const LEFTOVER_KILL_TIMEOUT_MS = 10_000;
/** Restored VMs kept ready beyond `min` (restore pools only). */
const SPARES = 1;
/** Recoveries one launch may go through: a retry of a refused snapshot, then its replacement. */
const MAX_HEALS = 2;

/** @internal What a pool's image does when a restore fails, and when one works (runtime/image.ts). */
export interface PoolHealth {
  /** Resolves how to make VMs now (`retry`: the same snapshot again), or undefined when the failure is not the snapshot's. */
  recover(failed: VmSpec, err: Error): Promise<{ spec: VmSpec; origin: SnapshotMeta; retry: boolean } | undefined>;
  /** A restore worked. */
  restored(): void;
}
/** The warm-up run in a spare: the agent itself, which every image has (at /proc/1/exe). */
const WARMUP_ARGV = ["/proc/1/exe", "--version"];

export interface PoolStats {
  /** Total VMs: idle plus checked out (booting ones not counted). */
  alive: number;
  inUse: number;
  idle: number;
  /** acquire() callers waiting for a VM. */
  waiting: number;
  min: number;
  max: number;
  /** Guest RAM and CPUs of each VM. */
  memoryMib: number;
  vcpus: number;
}

interface Waiter {
  resolve: (vm: Vm) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout | undefined;
}

interface IdleEntry {
  machine: MicroVm;
  since: number;
}

export class Pool {
  private readonly idle: IdleEntry[] = [];
  private readonly inUse = new Set<Vm>();
  private readonly waiters: Waiter[] = [];
  private booting = 0;
  /** Released VMs being stopped: still alive, so still counted against `max`. */
  private stopping = 0;
  private readonly spares: MicroVm[] = [];
  /** VMs on their way to being the pool's (spares and boots starting): shutdown kills them too. */
  private readonly starting = new Set<{ kill(): Promise<unknown> }>();
  /** Aborted by shutdown(): QEMU processes still starting for the pool are killed at once. */
  private readonly closing = new AbortController();
  private preparing = 0;
  private closed = false;
  /** Replaced by a pool on a newer snapshot (watch mode): serves who waits, keeps nothing idle. */
  private retiring = false;
  private drained: (() => void) | undefined;
  private lastBootError: Error | undefined;
  private idleTimer: NodeJS.Timeout | undefined;

  /** A recovery from a failed restore in progress (see `recover`). */
  private healing: Promise<boolean> | undefined;

  private constructor(
    private spec: VmSpec,
    private readonly defaults: ExecDefaults,
    private readonly opts: ResolvedPool,
    /** Started in every new VM, when the snapshot does not already run it. */
    private readonly workload?: WorkloadSpec,
    /** The snapshot VMs come from (for vm.snapshot). */
    private origin?: VmOrigin,
    /** Gives back the pool's lease on its snapshot (store/leases.ts), at shutdown. */
    private readonly releaseLease: () => void = () => {},
    /** What the image does about failed and successful restores (restore pools only). */
    private readonly health?: PoolHealth,
  ) {
    // Every VM starting for the pool listens on this signal until it is up (and removes its
    // listener then): a pool restoring many at once is not a leak.
    setMaxListeners(0, this.closing.signal);
    if (opts.idleTimeoutMs !== undefined) {
      this.idleTimer = setInterval(() => this.evictIdle(), Math.max(50, Math.min(opts.idleTimeoutMs / 2, 5_000)));
      this.idleTimer.unref();
    }
  }

  /** @internal How the library makes one (users get it from the API, never by `new`). */
  static create(spec: VmSpec, defaults: ExecDefaults, opts: ResolvedPool, workload?: WorkloadSpec, origin?: VmOrigin, releaseLease: () => void = () => {}, health?: PoolHealth): Pool {
    return new Pool(spec, defaults, opts, workload, origin, releaseLease, health);
  }

  /**
   * @internal Makes the initial `min` VMs ready; rejects if the first boot fails. `handoff`, the
   * VM the image was baked from, is the first of them when given (warm handoff).
   */
  async warm(handoff?: MicroVm): Promise<void> {
    this.refillSpares();
    let adopted = 0;
    if (handoff && handoff.aliveNow) {
      try {
        await this.startWorkloadIn(handoff);
        // Not through pump: the boots below are warm's own (awaited), and pump would start one
        // more for the same missing VM.
        this.adopt(handoff, false);
        adopted = 1;
      } catch (err) {
        log("warm handoff failed: %s", (err as Error).message);
      }
    }
    const boots: Promise<void>[] = [];
    for (let i = adopted; i < this.opts.min; i++) boots.push(this.bootOne());
    const results = await Promise.allSettled(boots);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed && this.idle.length === 0) {
      await this.shutdown();
      throw failed.reason;
    }
  }

  stats(): PoolStats {
    return {
      alive: this.idle.length + this.inUse.size,
      inUse: this.inUse.size,
      idle: this.idle.length,
      waiting: this.waiters.length,
      min: this.opts.min,
      max: this.opts.max,
      memoryMib: this.spec.memoryMib,
      vcpus: this.spec.vcpus,
    };
  }

  acquire(): Promise<Vm> {
    const network = this.opts.network;
    if (network === "none") return this.acquireVm();
    // Egress is per checkout: on at acquire, off at release (netStats count from here).
    return this.acquireVm().then(async (vm) => {
      try {
        await vm.startEgress(network);
      } catch (err) {
        await vm.release().catch(() => {});
        throw new PoolError("POOL_NETWORK_FAILED", `pool.acquire: cannot start the VM's egress: ${(err as Error).message}`, {
          cause: err,
          hint: "the guest's proxy port (127.0.0.1:3128) may be taken by a process of the image; see DEBUG=supermachine:net",
        });
      }
      return vm;
    });
  }

  private acquireVm(): Promise<Vm> {
    if (this.closed) return Promise.reject(new PoolError("POOL_SHUT_DOWN", "pool.acquire: the pool has been shut down"));
    const machine = this.takeIdle();
    if (machine && this.waiters.length === 0) {
      const vm = this.checkout(machine);
      this.pump();
      return Promise.resolve(vm);
    }
    if (machine) this.idle.unshift({ machine, since: Date.now() });
    return new Promise<Vm>((resolve, reject) => {
      const w: Waiter = { resolve, reject, timer: undefined };
      const t = this.opts.acquireTimeoutMs;
      if (t > 0) {
        w.timer = setTimeout(() => {
          const i = this.waiters.indexOf(w);
          if (i >= 0) this.waiters.splice(i, 1);
          const s = this.stats();
          reject(
            new PoolError("POOL_ACQUIRE_TIMEOUT", `pool.acquire: no VM became free within ${t} ms (${s.inUse} in use, max ${s.max})`, {
              hint: "release VMs sooner, raise max, or pass acquireTimeoutMs: 0 to wait without limit",
              cause: this.lastBootError,
            }),
          );
        }, t);
      }
      this.waiters.push(w);
      this.pump();
    });
  }

  /** Stops every VM (idle and checked out) and rejects waiting acquire() calls. */
  async shutdown(): Promise<void> {
    this.closed = true;
    this.closing.abort(new PoolError("POOL_SHUT_DOWN", "the pool was shut down while a VM was starting"));
    this.releaseLease();
    if (this.idleTimer) clearInterval(this.idleTimer);
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(new PoolError("POOL_SHUT_DOWN", "pool.acquire: the pool was shut down while waiting"));
    }
    const machines = [...this.idle.splice(0).map((e) => e.machine), ...[...this.inUse].map((v) => v.machine)];
    this.inUse.clear();
    await Promise.all([...machines, ...this.spares.splice(0), ...this.starting].map((m) => m.kill()));
    // Boots and spares still in flight notice `closed` and kill their process, releases finish
    // stopping theirs; wait for them.
    while (this.booting > 0 || this.preparing > 0 || this.stopping > 0) await new Promise((r) => setTimeout(r, 10));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.shutdown();
  }

  /**
   * @internal Winds the pool down for a successor (watch mode): idle VMs and spares stop now,
   * callers already waiting are still served, VMs checked out finish; once the last one is
   * released the pool shuts down (giving back its lease on the snapshot) and this resolves.
   */
  async retire(): Promise<void> {
    if (this.closed) return;
    this.retiring = true;
    const idle = this.idle.splice(0).map((e) => e.machine);
    await Promise.all([...idle, ...this.spares.splice(0)].map((m) => m.kill()));
    await new Promise<void>((resolve) => {
      this.drained = resolve;
      this.pump();
    });
    await this.shutdown();
  }

  private takeIdle(): MicroVm | undefined {
    while (this.idle.length) {
      const e = this.idle.pop()!;
      if (e.machine.aliveNow) return e.machine;
      log("dropping dead idle VM %d", e.machine.pid);
      void e.machine.kill();
    }
    return undefined;
  }

  private checkout(machine: MicroVm): Vm {
    const vm = Vm.create(machine, this.defaults, (v) => this.onRelease(v), this.origin);
    this.inUse.add(vm);
    void machine.exited.then(() => {
      if (!this.closed && this.inUse.has(vm)) log("checked-out VM %d died", machine.pid);
    });
    return vm;
  }

  private async onRelease(vm: Vm): Promise<void> {
    if (!this.inUse.delete(vm)) return;
    const t0 = performance.now();
    const m = vm.machine;
    if (this.closed || this.retiring || this.opts.restoreOnRelease || !m.alive || !(await this.killLeftovers(m))) {
      this.stopping++;
      try {
        await m.kill();
      } finally {
        this.stopping--;
      }
    } else {
      this.idle.push({ machine: m, since: Date.now() });
    }
    phaseSince("pool.release", t0);
    this.pump();
  }

  /**
   * A VM going back to the pool as it was left: what its execs left running in the background
   * is killed (except what they started with `detach`). False when the guest did not do it (the
   * VM is then replaced rather than handed on).
   */
  private async killLeftovers(m: MicroVm): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    try {
      const n = await Promise.race([
        m.agent.killBackground(),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`no answer within ${LEFTOVER_KILL_TIMEOUT_MS} ms`)), LEFTOVER_KILL_TIMEOUT_MS);
        }),
      ]);
      if (n > 0) log("VM %d: killed the background processes of %d exec(s) at release", m.pid, n);
      return true;
    } catch (err) {
      log("VM %d: killing background processes at release failed (%s); replacing the VM", m.pid, (err as Error).message);
      return false;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Serve waiters from idle VMs, then boot what the waiters and `min` still need. */
  private pump(): void {
    if (this.closed) return;
    if (this.retiring && this.inUse.size === 0 && this.waiters.length === 0 && this.booting === 0) {
      this.drained?.();
      return;
    }
    while (this.waiters.length) {
      const m = this.takeIdle();
      if (!m) break;
      const w = this.waiters.shift()!;
      clearTimeout(w.timer);
      w.resolve(this.checkout(m));
    }
    const total = this.idle.length + this.inUse.size + this.booting + this.stopping;
    const wanted = this.waiters.length + (this.retiring ? 0 : this.opts.min) - this.idle.length - this.booting;
    const room = this.opts.max - total;
    for (let i = 0; i < Math.min(wanted, room); i++) {
      this.bootOne().catch(() => {});
    }
  }

  /** Keeps SPARES restored, warmed VMs ready (restore pools only). */
  private refillSpares(): void {
    if (this.closed || this.retiring || this.spec.incomingState === undefined) return;
    while (this.spares.length + this.preparing < SPARES) {
      this.preparing++;
      const spec = this.spec;
      this.prepareSpare(spec).then(
        (m) => {
          if (this.closed) {
            // shutdown() waits on `preparing`: count this one until it is gone.
            void m.kill().finally(() => this.preparing--);
            return;
          }
          if (this.spec !== spec) {
            // Restored from a snapshot the pool no longer uses (found damaged meanwhile).
            this.preparing--;
            void m.kill();
            this.refillSpares();
            return;
          }
          this.preparing--;
          this.spares.push(m);
          void m.exited.then(() => {
            const i = this.spares.indexOf(m);
            if (i >= 0) this.spares.splice(i, 1);
          });
          // A caller may be waiting for exactly this.
          if (this.waiters.length) this.pump();
        },
        (err: Error) => {
          this.preparing--;
          log("preparing a spare VM failed: %s", err.message);
          // A snapshot QEMU refuses is found here as well as by acquire: heal it in the background.
          if (isRestoreFault(err)) void this.healFrom(spec, err).catch((e: Error) => log("recovering after a failed spare: %s", e.message));
        },
      );
    }
  }

  private async prepareSpare(spec: VmSpec): Promise<MicroVm> {
    const pending = await MicroVm.prestart({ ...spec, signal: this.closing.signal });
    return this.whileStarting(pending, async () => {
      const m = await pending.start();
      this.health?.restored();
      return this.whileStarting(m, async () => {
        await m.agent.spawnBench(WARMUP_ARGV, 1).catch((e: Error) => log("warm-up of VM %d: %s", m.pid, e.message));
        await this.startWorkloadIn(m);
        return m;
      });
    });
  }

  /**
   * Runs `fn` on a VM that is not the pool's yet (a spare or a boot on its way), with the VM
   * known to shutdown(), which kills it: whatever `fn` awaits from the guest then fails, rather
   * than keeping shutdown (and the program) waiting on a guest that does not answer.
   */
  private async whileStarting<T>(vm: { kill(): Promise<unknown> }, fn: () => Promise<T>): Promise<T> {
    if (this.closed) {
      await vm.kill();
      throw new PoolError("POOL_SHUT_DOWN", "the pool was shut down while a VM was starting");
    }
    this.starting.add(vm);
    try {
      return await fn();
    } finally {
      this.starting.delete(vm);
    }
  }

  /**
   * A new VM: a spare if one is ready, or a restore (or boot) now. A restore that fails has the
   * snapshot verified: a damaged one is quarantined and rebaked; one QEMU refused is tried again,
   * and quarantined and rebaked if it fails again. Then the restore is tried from what it has now.
   */
  private async launchOne(): Promise<MicroVm> {
    let spare: MicroVm | undefined;
    while ((spare = this.spares.shift()) && !spare.aliveNow) void spare.kill();
    this.refillSpares();
    if (spare) return spare;
    let spec = this.spec;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.restore(spec);
      } catch (err) {
        if (attempt > MAX_HEALS || !(await this.healFrom(spec, err as Error))) throw err;
        spec = this.spec;
      }
    }
  }

  private async restore(spec: VmSpec): Promise<MicroVm> {
    const m = await MicroVm.launch({ ...spec, signal: this.closing.signal });
    if (spec.incomingState !== undefined) this.health?.restored();
    return this.whileStarting(m, async () => {
      await this.startWorkloadIn(m);
      return m;
    });
  }

  /**
   * After a failed restore from `failed`: true when the pool now restores from another (sound or
   * rebaked) snapshot or should try the same one again, false when the failure was something else.
   * Concurrent failures share one recovery.
   */
  private async healFrom(failed: VmSpec, err: Error): Promise<boolean> {
    if (!this.health || failed.incomingState === undefined || this.closed) return false;
    if (this.spec !== failed) return true; // recovered since this restore started
    this.healing ??= (async () => {
      try {
        const next = await this.health!.recover(failed, err);
        if (!next) return false;
        this.spec = next.spec;
        if (!next.retry) {
          if (this.origin) this.origin = { ...this.origin, meta: next.origin };
          // VMs restored from the damaged snapshot that were not handed out yet go.
          for (const s of this.spares.splice(0)) void s.kill();
          for (const e of this.idle.splice(0)) void e.machine.kill();
        }
        this.refillSpares();
        return true;
      } finally {
        this.healing = undefined;
      }
    })();
    return this.healing;
  }

  private async startWorkloadIn(m: MicroVm): Promise<void> {
    if (!this.workload) return;
    try {
      await startWorkload(m, this.workload);
    } catch (err) {
      await m.kill();
      throw err;
    }
  }

  /** @internal Spare VMs ready to be handed out (benchmarks, diagnostics). */
  spareCount(): number {
    return this.spares.length;
  }

  private async bootOne(): Promise<void> {
    this.booting++;
    let machine: MicroVm;
    const t0 = performance.now();
    try {
      machine = await this.launchOne();
      phaseSince("pool.launch", t0);
    } catch (err) {
      this.booting--;
      this.lastBootError = err as Error;
      log("boot failed: %s", (err as Error).message);
      // A waiter that caused this boot learns why, rather than waiting for its timeout.
      const w = this.waiters.shift();
      if (w) {
        clearTimeout(w.timer);
        w.reject(err as Error);
      }
      throw err;
    }
    if (this.closed) {
      await machine.kill();
      this.booting--;
      return;
    }
    this.booting--;
    this.adopt(machine);
  }

  /** Takes a ready VM into the pool (idle, watched for death). */
  /** Takes a running VM as idle; `serve`: then hand it to a waiter, or boot what is still missing. */
  private adopt(machine: MicroVm, serve = true): void {
    void machine.exited.then(() => {
      const i = this.idle.findIndex((e) => e.machine === machine);
      if (i >= 0 && !this.closed) {
        this.idle.splice(i, 1);
        log("idle VM %d died; replacing it", machine.pid);
        this.pump();
      }
    });
    this.idle.push({ machine, since: Date.now() });
    if (serve) this.pump();
  }

  private evictIdle(): void {
    const limit = this.opts.idleTimeoutMs;
    if (limit === undefined || this.closed) return;
    const now = Date.now();
    // Oldest first: idle is a stack (pop = most recently used), so scan from the bottom.
    for (let i = 0; i < this.idle.length && this.idle.length > this.opts.min; ) {
      const e = this.idle[i]!;
      if (now - e.since >= limit) {
        this.idle.splice(i, 1);
        log("evicting VM %d idle for %d ms", e.machine.pid, now - e.since);
        void e.machine.kill();
      } else i++;
    }
  }
}
