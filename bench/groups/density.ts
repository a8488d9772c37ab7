/** Benchmark group `density`: memory per idle VM with many VMs of one snapshot. */
import { memoryOf } from "../util.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const densityGroup: BenchGroup = {
  name: "density",
  metrics: ["idle_vm_pss_mib", "idle_vm_rss_mib"],
  run: (ctx) => densityBenchmark(ctx),
};

/** PSS per idle VM with many VMs restored from one snapshot (shared RAM pages counted once). */
async function densityBenchmark(ctx: BenchContext): Promise<void> {
  const { quick, recordValue } = ctx;
  const image = await ctx.busybox();
  const count = quick ? 5 : 20;
  const pool = await image.pool({ min: 0, max: count, restoreOnRelease: false });
  try {
    const vms = [];
    for (let i = 0; i < count; i++) vms.push(await pool.acquire());
    await new Promise((r) => setTimeout(r, 2_000));
    const pss = vms.map((v) => memoryOf(v.pid).pss);
    const rss = vms.map((v) => memoryOf(v.pid).rss);
    recordValue("idle_vm_pss_mib", pss.reduce((a, b) => a + b, 0) / count, count, "MiB");
    recordValue("idle_vm_rss_mib", rss.reduce((a, b) => a + b, 0) / count, count, "MiB");
    await Promise.all(vms.map((v) => v.release()));
  } finally {
    await pool.shutdown();
  }
}
