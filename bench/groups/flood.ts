/** Benchmark group `flood`: host memory while a guest floods a stdout nobody reads. */
import { type Vm } from "../../src/runtime/vm.js";
import { MiB } from "../util.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const floodGroup: BenchGroup = {
  name: "flood",
  metrics: ["unread_flood_rss_growth_mib"],
  sharedVm: true,
  run: async (ctx) => floodBenchmark(ctx, await ctx.sharedVm()),
};

/**
 * Host RSS growth while a guest floods a stdout nobody reads (flow control keeps it bounded):
 * the peak RSS during the flood against the RSS just before it, after a full GC.
 */
async function floodBenchmark(ctx: BenchContext, v: Vm): Promise<void> {
  const { quick, recordValue } = ctx;
  const seconds = quick ? 4 : 10;
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) throw new Error("run with node --expose-gc (npm run bench does)");
  gc();
  await new Promise((r) => setTimeout(r, 200));
  gc();
  const before = process.memoryUsage().rss;
  let peak = before;
  const child = await v.spawn({ argv: ["yes", "flood"] });
  const end = performance.now() + seconds * 1000;
  while (performance.now() < end) {
    peak = Math.max(peak, process.memoryUsage().rss);
    await new Promise((r) => setTimeout(r, 50));
  }
  // The guest really was producing: once read, the output flows.
  const first = await child.readStdout(MiB);
  if (!first.toString().startsWith("flood\n")) throw new Error("unexpected flood output");
  await child.signal(9);
  child.stdout.resume();
  await child.wait();
  recordValue("unread_flood_rss_growth_mib", (peak - before) / MiB, Math.round(seconds * 20), "MiB");
}
