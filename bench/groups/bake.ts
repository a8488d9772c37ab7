/** Benchmark group `bake`: baking busybox: cold, cached, and with a warmup. */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Image } from "../../src/runtime/image.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const bakeGroup: BenchGroup = {
  name: "bake",
  metrics: ["cold_bake_ms", "cache_hit_bake_ms", "warmup_bake_ms"],
  run: (ctx) => bakeBenchmarks(ctx),
};

async function bakeBenchmarks(ctx: BenchContext): Promise<void> {
  const { quick, record } = ctx;
  const dir = mkdtempSync(join(tmpdir(), "sm-bench-snapshots-"));
  try {
    const cold: number[] = [];
    for (let i = 0; i < (quick ? 1 : 3); i++) {
      const t0 = performance.now();
      await Image.build({ ref: "builtin:busybox", snapshotsDir: dir, name: `cold-${i}` });
      cold.push(performance.now() - t0);
    }
    record("cold_bake_ms", cold);
    const hit: number[] = [];
    for (let i = 0; i < (quick ? 30 : 100); i++) {
      const t0 = performance.now();
      await Image.build({ ref: "builtin:busybox", snapshotsDir: dir, name: "cold-0" });
      hit.push(performance.now() - t0);
    }
    record("cache_hit_bake_ms", hit);
    // The same bake with a warmup that runs one exec (the warmup and its bookkeeping).
    const warm: number[] = [];
    for (let i = 0; i < (quick ? 1 : 3); i++) {
      const t0 = performance.now();
      await Image.build({
        ref: "builtin:busybox",
        snapshotsDir: dir,
        name: `warm-${i}`,
        warmup: async (w) => {
          await w.exec({ argv: ["echo", "warm"] });
        },
      });
      warm.push(performance.now() - t0);
    }
    record("warmup_bake_ms", warm);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
