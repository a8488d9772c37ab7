/** Benchmark group `load`: load and leaks (the probes of bench/load.ts). */
import { concurrentAcquires, hostResources, privateTempDirs, quiesce, runExecSoak, vmLoop } from "../load.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const loadGroup: BenchGroup = {
  name: "load",
  metrics: ["acquire_200_concurrent_ms", "exec_10k_rss_growth_mib", "exec_10k_heap_growth_mib", "leaked_fds_after_100_vms"],
  run: (ctx) => loadBenchmarks(ctx),
};

/**
 * Load and leaks (bench/load.ts, the same probes as test/vm/load.test.ts): 200 callers at once on
 * a pool of max 4 (acquire, exec, release; wall time), RSS growth over 10 000 execs on one VM
 * (in a fresh Node process with a fixed young generation, after 2 000 warm-up execs), and the fds
 * left open after 100 VMs were started and stopped.
 */
async function loadBenchmarks(ctx: BenchContext): Promise<void> {
  const { quick, record, recordValue, progress } = ctx;
  const image = await ctx.busybox();
  const wall: number[] = [];
  for (let i = 0; i < (quick ? 1 : 3); i++) {
    const r = await concurrentAcquires(image, { n: 200, max: 4 });
    if (r.order.some((c, j) => c !== j)) throw new Error("acquires were not served in arrival order");
    progress(`200 concurrent acquires: ${Math.round(r.wallMs)} ms, at most ${r.maxInUse} in use and ${r.maxLive} QEMU processes, ${r.launched} started`);
    wall.push(r.wallMs);
  }
  record("acquire_200_concurrent_ms", wall);

  const n = quick ? 2_000 : 10_000;
  const soak = await runExecSoak({ n, warmup: quick ? 1_000 : 2_000, timeoutMs: 900_000 });
  progress(`${n} execs in ${Math.round(soak.execMs)} ms: RSS ${soak.rssBeforeMiB} -> ${soak.rssAfterMiB} MiB, heap +${soak.heapGrowthMiB} MiB, fds ${soak.fdDelta >= 0 ? "+" : ""}${soak.fdDelta}`);
  recordValue("exec_10k_rss_growth_mib", soak.rssGrowthMiB, n, "MiB");
  recordValue("exec_10k_heap_growth_mib", soak.heapGrowthMiB, n, "MiB");

  const dirs = privateTempDirs();
  let loop, leaks;
  try {
    const before = hostResources();
    loop = await vmLoop(image, { n: quick ? 20 : 100 });
    leaks = await quiesce(before);
  } finally {
    dirs.restore();
  }
  progress(`${loop.launched} VMs started and stopped in ${Math.round(loop.wallMs)} ms; left behind: ${JSON.stringify(leaks)}`);
  recordValue("leaked_fds_after_100_vms", leaks.fdDelta, loop.launched, "fds");
}
