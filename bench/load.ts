/**
 * Load and leak probes shared by the benchmarks (`bench/run.ts`) and the load tests
 * (`test/vm/load.test.ts`): many concurrent acquires on a small pool, many VMs started and
 * stopped, many execs on one VM, each with what the host process holds before and after.
 */
import { execFile } from "node:child_process";
import { chmodSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { connect } from "node:net";
import { join } from "node:path";
import { packageRoot } from "../src/engine/artifacts.js";
import { engineCounters, MicroVm } from "../src/engine/qemu.js";
import { execDefaults } from "../src/session/env.js";
import { GuestSession } from "../src/session/session.js";
import { runtimeRoot } from "../src/paths.js";
import type { Image } from "../src/runtime/image.js";
import type { Vm } from "../src/runtime/vm.js";

const MiB = 1024 * 1024;

/** What this process holds that a leak would make grow. */
export interface HostResources {
  /** Targets of /proc/self/fd (`socket:[…]`, `pipe:[…]`, paths). */
  fds: string[];
  /** Pids whose parent is this process (QEMU runs as our direct child, through setpriv's exec). */
  children: number[];
  /** This process's per-VM runtime directories (`sm-<pid>-*` under the runtime root). */
  runDirs: string[];
  /** Entries of the system temp directory (meaningful when TMPDIR is private to the caller). */
  tmpEntries: string[];
  /** Handles and requests keeping the event loop alive, by kind. */
  handles: Record<string, number>;
  /** Listeners on process "exit" (each pool's snapshot lease adds one until shutdown). */
  exitListeners: number;
}

export function hostResources(): HostResources {
  const fds: string[] = [];
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      fds.push(readlinkSync(`/proc/self/fd/${fd}`));
    } catch {
      /* the fd readdir itself used, closed since */
    }
  }
  const children: number[] = [];
  for (const p of readdirSync("/proc")) {
    if (!/^\d+$/.test(p)) continue;
    try {
      const stat = readFileSync(`/proc/${p}/stat`, "latin1");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid === process.pid) children.push(Number(p));
    } catch {
      /* exited meanwhile */
    }
  }
  const list = (dir: string) => {
    try {
      return readdirSync(dir);
    } catch {
      return [];
    }
  };
  const handles: Record<string, number> = {};
  for (const h of process.getActiveResourcesInfo()) handles[h] = (handles[h] ?? 0) + 1;
  return {
    fds,
    children,
    runDirs: list(runtimeRoot()).filter((n) => n.startsWith(`sm-${process.pid}-`)),
    tmpEntries: list(tmpdir()),
    handles,
    exitListeners: process.listenerCount("exit"),
  };
}

/**
 * Points TMPDIR and the runtime directory (`SUPERMACHINE_RUNTIME_DIR`) at fresh private
 * directories, so that whatever appears in them is this process's; `restore()` puts the
 * environment back and removes them.
 */
export function privateTempDirs(): { tmp: string; run: string; restore(): void } {
  const saved = { TMPDIR: process.env.TMPDIR, SUPERMACHINE_RUNTIME_DIR: process.env.SUPERMACHINE_RUNTIME_DIR };
  const root = mkdtempSync(join(tmpdir(), "sm-load-"));
  const tmp = join(root, "tmp");
  const run = join(root, "run");
  mkdirSync(tmp);
  mkdirSync(run);
  // QEMU's user (when we are root) reaches its sockets through these: traversable, not listable.
  chmodSync(root, 0o711);
  chmodSync(run, 0o711);
  process.env.TMPDIR = tmp;
  process.env.SUPERMACHINE_RUNTIME_DIR = run;
  return {
    tmp,
    run,
    restore() {
      for (const [k, v] of Object.entries(saved)) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
      rmSync(root, { recursive: true, force: true });
    },
  };
}

export interface Leaks {
  /** fds held now minus fds held before. */
  fdDelta: number;
  /** Targets held now that were not held before (socket and pipe ids are new for new ones). */
  newFds: string[];
  children: number[];
  runDirs: string[];
  tmpEntries: string[];
  /** Kinds of handle that are more numerous than before. */
  handles: Record<string, number>;
  exitListeners: number;
}

export function leaksBetween(before: HostResources, after: HostResources): Leaks {
  const handles: Record<string, number> = {};
  for (const [k, n] of Object.entries(after.handles)) if (n > (before.handles[k] ?? 0)) handles[k] = n - (before.handles[k] ?? 0);
  return {
    fdDelta: after.fds.length - before.fds.length,
    newFds: after.fds.filter((f) => !before.fds.includes(f)),
    children: after.children.filter((p) => !before.children.includes(p)),
    runDirs: after.runDirs.filter((d) => !before.runDirs.includes(d)),
    tmpEntries: after.tmpEntries.filter((d) => !before.tmpEntries.includes(d)),
    handles,
    exitListeners: after.exitListeners - before.exitListeners,
  };
}

/** Waits until what stopped VMs leave behind is gone (exit events, closed handles), or `ms` passed. */
export async function quiesce(before: HostResources, ms = 5_000): Promise<Leaks> {
  const end = Date.now() + ms;
  for (;;) {
    const l = leaksBetween(before, hostResources());
    const clean = l.fdDelta <= 0 && !l.children.length && !l.runDirs.length && !l.tmpEntries.length && !Object.keys(l.handles).length && l.exitListeners <= 0;
    if (clean || Date.now() > end) return l;
    await new Promise((r) => setTimeout(r, 50));
  }
}

export interface ConcurrentAcquires {
  wallMs: number;
  /** Caller indexes in the order their acquire() resolved. */
  order: number[];
  /** Most VMs checked out at once (pool.stats().inUse, sampled at every acquire). */
  maxInUse: number;
  /** Most QEMU processes alive at once (sampled at every acquire and every 10 ms). */
  maxLive: number;
  /** QEMU processes started during the run. */
  launched: number;
}

/**
 * `n` callers acquire at once from a pool of at most `max` VMs; each runs one exec (checking its
 * output) and releases. Resolves once every caller is served and the pool is shut down.
 */
export async function concurrentAcquires(image: Image, o: { n: number; max: number }): Promise<ConcurrentAcquires> {
  const pool = await image.pool({ min: 1, max: o.max, acquireTimeoutMs: 0 });
  const launched0 = engineCounters().launched;
  const order: number[] = [];
  let maxInUse = 0;
  let maxLive = 0;
  const sample = () => (maxLive = Math.max(maxLive, engineCounters().live));
  const sampler = setInterval(sample, 10);
  try {
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: o.n }, (_, i) =>
        pool.acquire().then(async (vm) => {
          order.push(i);
          maxInUse = Math.max(maxInUse, pool.stats().inUse);
          sample();
          try {
            const r = await vm.exec({ argv: ["echo", `caller ${i}`], timeoutMs: 60_000 });
            if (r.exitCode !== 0 || r.stdout.toString() !== `caller ${i}\n`) throw new Error(`caller ${i}: exec gave ${r.exitCode} ${JSON.stringify(r.stdout.toString())}`);
          } finally {
            await vm.release();
          }
        }),
      ),
    );
    const wallMs = performance.now() - t0;
    return { wallMs, order, maxInUse, maxLive, launched: engineCounters().launched - launched0 };
  } finally {
    clearInterval(sampler);
    await pool.shutdown();
  }
}

export interface VmLoop {
  /** QEMU processes started (and stopped) by the loop. */
  launched: number;
  wallMs: number;
}

/**
 * Starts and stops at least `n` VMs, every way a program does: acquire/exec/release on a
 * restoring pool (each release stops the VM and a fresh restore replaces it), pools opened and
 * shut down, and plain cold boots (engine launch and stop). Each VM runs one exec; those of the
 * restoring pool are also left with what a careless caller leaves at release: a process still
 * running, a TCP forwarder (after one connection through it) and the vsock socket.
 */
export async function vmLoop(image: Image, o: { n: number }): Promise<VmLoop> {
  const launched0 = engineCounters().launched;
  const launched = () => engineCounters().launched - launched0;
  const t0 = performance.now();
  const exec = async (vm: GuestSession, i: number) => {
    const r = await vm.exec({ argv: ["echo", `vm ${i}`], timeoutMs: 60_000 });
    if (r.stdout.toString() !== `vm ${i}\n`) throw new Error(`vm ${i}: exec gave ${JSON.stringify(r.stdout.toString())}`);
  };
  // A tenth each of pool lifecycles and cold boots, the rest restores through one pool.
  const pools = Math.max(1, Math.round(o.n / 10));
  for (let i = 0; i < pools; i++) {
    const pool = await image.pool({ min: 1, max: 1 });
    try {
      const vm = await pool.acquire();
      await exec(vm, i);
      await vm.release();
    } finally {
      await pool.shutdown();
    }
  }
  const boots = Math.max(1, Math.round(o.n / 10));
  for (let i = 0; i < boots; i++) {
    const m = await MicroVm.launch({ rootfs: image.rootfsPath, memoryMib: image.memoryMib, vcpus: image.vcpus });
    const session = new GuestSession(m, execDefaults(image.config, {}));
    try {
      await exec(session, i);
    } finally {
      await session.closeSession(new Error("stopped"));
      await m.stop();
    }
  }
  const pool = await image.pool({ min: 1, max: 1, restoreOnRelease: true });
  try {
    for (let i = 0; launched() < o.n; i++) {
      const vm = await pool.acquire();
      await exec(vm, i);
      await vm.spawn({ argv: ["sleep", "600"] });
      const fwd = await vm.exposeTcp(0, 80);
      await new Promise<void>((resolve) => {
        // Nothing listens on the guest's port 80: the forwarded connection is closed.
        const s = connect(fwd.port, "127.0.0.1");
        s.on("error", () => {});
        s.on("close", () => resolve());
        s.resume();
      });
      void vm.vsockPath;
      await vm.release();
    }
  } finally {
    await pool.shutdown();
  }
  return { launched: launched(), wallMs: performance.now() - t0 };
}

export interface ExecSoak {
  n: number;
  warmup: number;
  /** RSS after a full GC, before and after the `n` execs (MiB). */
  rssBeforeMiB: number;
  rssAfterMiB: number;
  rssGrowthMiB: number;
  /** V8 heap in use after a full GC: growth over the `n` execs (MiB). */
  heapGrowthMiB: number;
  /** Memory outside the V8 heap (Buffers and the like): growth (MiB). */
  externalGrowthMiB: number;
  fdDelta: number;
  newFds: string[];
  execMs: number;
}

/** Full GCs until the heap settles (needs --expose-gc). */
export async function settleHeap(): Promise<void> {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) throw new Error("run with node --expose-gc");
  for (let i = 0; i < 3; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * `warmup` execs (so the JIT, V8's heap sizing and the pools of buffers reach their steady
 * state), then `n` more, each checked; memory and fds are read after a full GC before and after
 * the `n`.
 */
export async function execSoak(vm: Vm, o: { n: number; warmup: number }): Promise<ExecSoak> {
  const run = async (i: number) => {
    const r = await vm.exec({ argv: ["echo", `exec ${i}`], timeoutMs: 60_000 });
    if (r.exitCode !== 0 || r.stdout.toString() !== `exec ${i}\n`) throw new Error(`exec ${i} gave ${r.exitCode} ${JSON.stringify(r.stdout.toString())}`);
  };
  for (let i = 0; i < o.warmup; i++) await run(i);
  await settleHeap();
  const m0 = process.memoryUsage();
  const r0 = hostResources();
  const t0 = performance.now();
  for (let i = 0; i < o.n; i++) await run(i);
  const execMs = performance.now() - t0;
  await settleHeap();
  const m1 = process.memoryUsage();
  const l = leaksBetween(r0, hostResources());
  const mib = (b: number) => Math.round((b / MiB) * 1000) / 1000;
  return {
    n: o.n,
    warmup: o.warmup,
    rssBeforeMiB: mib(m0.rss),
    rssAfterMiB: mib(m1.rss),
    rssGrowthMiB: mib(m1.rss - m0.rss),
    heapGrowthMiB: mib(m1.heapUsed - m0.heapUsed),
    externalGrowthMiB: mib(m1.external - m0.external),
    fdDelta: l.fdDelta,
    newFds: l.newFds,
    execMs,
  };
}

/**
 * V8 flags of the process `runExecSoak` starts: GC exposed, and a fixed 1 MiB young generation.
 * V8 otherwise grows and shrinks its semi-spaces with the allocation rate, which moves RSS by
 * tens of MiB either way and would hide (or fake) a leak of a few.
 */
export const SOAK_NODE_FLAGS = ["--expose-gc", "--min-semi-space-size=1", "--max-semi-space-size=1"];

/**
 * Runs `execSoak` on a busybox VM in a fresh Node process (the built `dist/bench/exec-soak.js`),
 * so that neither the caller's heap nor a test runner's moves the figures.
 */
export function runExecSoak(o: { n: number; warmup: number; timeoutMs: number }): Promise<ExecSoak> {
  const script = join(packageRoot(), "dist", "bench", "exec-soak.js");
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      [...SOAK_NODE_FLAGS, script, String(o.n), String(o.warmup)],
      { timeout: o.timeoutMs, killSignal: "SIGKILL", maxBuffer: 16 * MiB },
      (err, stdout, stderr) => {
        if (err) return reject(new Error(`${script} failed (${err.message.split("\n")[0]}):\n${stderr.slice(-4_000)}`));
        try {
          resolve(JSON.parse(stdout) as ExecSoak);
        } catch {
          reject(new Error(`${script} printed no result:\n${stdout.slice(-2_000)}\n${stderr.slice(-2_000)}`));
        }
      },
    );
  });
}
