/** Benchmark group `pool-cycle`: acquire, exec and release in a loop, two callers, fresh VMs each time. */
import type { BenchContext, BenchGroup } from "../harness.js";

export const poolCycleGroup: BenchGroup = {
  name: "pool-cycle",
  metrics: ["pool_cycle_per_s"],
  run: (ctx) => poolCycleBenchmark(ctx),
};

async function poolCycleBenchmark(ctx: BenchContext): Promise<void> {
  const { quick, recordValue } = ctx;
  const image = await ctx.busybox();
  const seconds = quick ? 8 : 30;
  const pool = await image.pool({ min: 2, max: 2, restoreOnRelease: true });
  let cycles = 0;
  try {
    const end = performance.now() + seconds * 1000;
    const worker = async () => {
      while (performance.now() < end) {
        const v = await pool.acquire();
        await v.exec({ argv: ["echo", "hi"] });
        await v.release();
        cycles++;
      }
    };
    const t0 = performance.now();
    await Promise.all([worker(), worker()]);
    recordValue("pool_cycle_per_s", cycles / ((performance.now() - t0) / 1000), cycles, "cycles/s");
  } finally {
    await pool.shutdown();
  }
}
