/** Benchmark group `watch`: watch mode: an edit to its new snapshot. */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ProjectWatcher, type WatchEvent } from "../../src/project/watch.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const watchGroup: BenchGroup = {
  name: "watch",
  metrics: ["watch_rebake_ms"],
  run: (ctx) => watchBenchmark(ctx),
};

/** Watch mode: from saving a helper one child of busybox imports to its new snapshot being ready. */
async function watchBenchmark(ctx: BenchContext): Promise<void> {
  const { quick, record } = ctx;
  const dir = mkdtempSync(join(tmpdir(), "sm-bench-watch-"));
  const helper = (n: number) =>
    `import type { WarmupVm } from "supermachine";\nexport async function warm(vm: WarmupVm) { await vm.exec({ argv: ["sh", "-c", "echo ${n} > /srv-n"] }); }\n`;
  try {
    mkdirSync(join(dir, "images"));
    writeFileSync(join(dir, "supermachine.config.ts"), `import { defineConfig } from "supermachine/config";\nexport default defineConfig({ images: ["./images/*.ts"], snapshotsDir: "./.snapshots" });\n`);
    writeFileSync(join(dir, "images/base.ts"), `import { defineImage } from "supermachine/config";\nexport default defineImage({ ref: "builtin:busybox" });\n`);
    writeFileSync(join(dir, "images/child.ts"), `import { defineImage } from "supermachine/config";\nimport { warm } from "../helper";\nexport default defineImage({ from: "base", warmup: warm });\n`);
    writeFileSync(join(dir, "helper.ts"), helper(0));
    const watcher = new ProjectWatcher({ cwd: dir, debounceMs: 50 });
    await watcher.start();
    try {
      const samples: number[] = [];
      for (let i = 1; i <= (quick ? 3 : 8); i++) {
        const done = new Promise<void>((resolve, reject) => {
          const on = (e: WatchEvent) => {
            if (e.type === "round-done" && e.round.rekeyed.includes("child")) {
              watcher.off("event", on);
              resolve();
            } else if (e.type === "round-failed") reject(e.error);
          };
          watcher.on("event", on);
        });
        const t0 = performance.now();
        writeFileSync(join(dir, "helper.ts"), helper(i));
        await done;
        samples.push(performance.now() - t0);
      }
      record("watch_rebake_ms", samples);
    } finally {
      await watcher.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
