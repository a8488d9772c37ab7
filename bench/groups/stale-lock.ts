/** Benchmark group `stale-lock`: taking over a dead writer's lock. */
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { BenchContext, BenchGroup } from "../harness.js";

export const staleLockGroup: BenchGroup = {
  name: "stale-lock",
  metrics: ["stale_lock_takeover_ms"],
  run: (ctx) => staleLockBenchmark(ctx),
};

/**
 * A writer SIGKILLed while it holds a store entry's lock (a bake killed mid-way): time from the
 * next publisher's call to its write starting, i.e. to the dead writer's lock being taken over.
 */
async function staleLockBenchmark(ctx: BenchContext): Promise<void> {
  const { quick, record } = ctx;
  const dir = mkdtempSync(join(tmpdir(), "sm-bench-lock-"));
  const publishJs = new URL("../../src/store/publish.js", import.meta.url).href;
  try {
    const samples: number[] = [];
    for (let i = 0; i < (quick ? 5 : 15); i++) {
      const target = join(dir, `entry-${i}`);
      const code = `import { publish } from ${JSON.stringify(publishJs)};
        await publish({ target: ${JSON.stringify(target)}, kind: "dir", what: "bench entry", check: async () => undefined,
          write: async () => { console.log("writing"); await new Promise(() => setInterval(() => {}, 1000)); } });`;
      const c = spawn(process.execPath, ["--input-type=module", "-e", code], { stdio: ["ignore", "pipe", "inherit"] });
      await new Promise<void>((resolve, reject) => {
        c.stdout!.on("data", (d: Buffer) => d.toString().includes("writing") && resolve());
        c.once("exit", () => reject(new Error("the writer exited before writing")));
      });
      const gone = new Promise((r) => c.once("exit", r));
      c.kill("SIGKILL");
      await gone;
      const { publish } = await import("../../src/store/publish.js");
      const t0 = performance.now();
      let took = NaN;
      await publish({ target, kind: "dir", what: "bench entry", check: async () => undefined, write: async () => void (took = performance.now() - t0) });
      samples.push(took);
    }
    record("stale_lock_takeover_ms", samples);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
