/** Benchmark group `fork-bomb`: how far past its timeout an exec running a fork bomb returns, beside a quiet one. */
import type { BenchContext, BenchGroup } from "../harness.js";

export const forkBombGroup: BenchGroup = {
  name: "fork-bomb",
  metrics: ["fork_bomb_timeout_overshoot_ms", "sleep_timeout_overshoot_ms"],
  run: (ctx) => forkBombBenchmark(ctx),
};

/**
 * How long past its `timeoutMs` an exec running a fork bomb returns (host clock: the call's
 * return minus the deadline), beside the same for a `sleep` that ignores the deadline as
 * quietly (the peer: what a timeout costs without any guest load). Each round on a fresh VM.
 */
async function forkBombBenchmark(ctx: BenchContext): Promise<void> {
  const { quick, record } = ctx;
  const image = await ctx.busybox();
  const rounds = quick ? 3 : 7;
  const timeoutMs = quick ? 3_000 : 5_000;
  const pool = await image.pool({ min: 1, max: 1, restoreOnRelease: true });
  const bomb: number[] = [];
  const plain: number[] = [];
  try {
    for (let i = 0; i < rounds; i++) {
      const v = await pool.acquire();
      try {
        for (const [argv, into] of [[["sleep", "1000"], plain], [["sh", "-c", "f() { f | f & }; f; exec sleep 3600"], bomb]] as const) {
          const t0 = performance.now();
          const r = await v.exec({ argv: [...argv], timeoutMs });
          into.push(performance.now() - t0 - timeoutMs);
          if (!r.timedOut) throw new Error(`${argv.join(" ")} was not timed out (exit ${r.exitCode})`);
        }
      } finally {
        await v.release();
      }
    }
  } finally {
    await pool.shutdown();
  }
  record("fork_bomb_timeout_overshoot_ms", bomb);
  record("sleep_timeout_overshoot_ms", plain);
}
