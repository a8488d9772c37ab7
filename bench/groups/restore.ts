/** Benchmark group `restore`: a pool's restore to the first exec, beside a plain QEMU -incoming restore. */
import { MicroVm } from "../../src/engine/qemu.js";
import { waitUntil } from "../util.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const restoreGroup: BenchGroup = {
  name: "restore",
  metrics: ["restore_to_exec_ms", "qemu_incoming_restore_ms"],
  run: (ctx) => restoreBenchmarks(ctx),
};

/**
 * A new VM from the snapshot through the pool (a pre-started process restores it) to the first
 * `echo` answered, beside the plain way: a QEMU process started cold with -incoming on the same
 * snapshot, timed to the agent's first answer.
 */
async function restoreBenchmarks(ctx: BenchContext): Promise<void> {
  const { quick, record } = ctx;
  const image = await ctx.busybox();
  const n = quick ? 8 : 20;
  const ours: number[] = [];
  const pool = await image.pool({ min: 0, max: 1, restoreOnRelease: true });
  try {
    for (let i = 0; i < n + 2; i++) {
      await waitUntil(() => pool.spareCount() > 0);
      const t0 = performance.now();
      const v = await pool.acquire();
      const r = await v.exec({ argv: ["echo", "hi"] });
      const dt = performance.now() - t0;
      if (r.stdout.toString() !== "hi\n") throw new Error("echo failed after restore");
      if (i >= 2) ours.push(dt);
      await v.release();
    }
  } finally {
    await pool.shutdown();
  }
  const plain: number[] = [];
  const spec = image.vmSpec(image.memoryMib, image.vcpus, 30_000);
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    const m = await MicroVm.launch(spec);
    plain.push(performance.now() - t0);
    await m.kill();
  }
  record("restore_to_exec_ms", ours);
  record("qemu_incoming_restore_ms", plain);
}
