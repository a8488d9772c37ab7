/** Benchmark group `acquire`: handing out an idle VM. */
import type { BenchContext, BenchGroup } from "../harness.js";

export const acquireGroup: BenchGroup = {
  name: "acquire",
  metrics: ["acquire_idle_ms"],
  run: (ctx) => acquireBenchmark(ctx),
};

async function acquireBenchmark(ctx: BenchContext): Promise<void> {
  const { quick, record } = ctx;
  const image = await ctx.busybox();
  const pool = await image.pool({ min: 1, max: 1, restoreOnRelease: false });
  try {
    const samples: number[] = [];
    for (let i = 0; i < (quick ? 300 : 1000); i++) {
      const t0 = performance.now();
      const v = await pool.acquire();
      samples.push(performance.now() - t0);
      await v.release();
    }
    record("acquire_idle_ms", samples);
  } finally {
    await pool.shutdown();
  }
}
