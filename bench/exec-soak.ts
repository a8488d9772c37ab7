/**
 * `node --expose-gc --min-semi-space-size=1 --max-semi-space-size=1 dist/bench/exec-soak.js <n> <warmup>`:
 * boots busybox, runs `warmup` then `n` execs on one VM, prints the ExecSoak figures as JSON.
 * Started by `runExecSoak` (bench/load.ts) for the benchmark and the load test.
 */
import { Image } from "../src/runtime/image.js";
import { execSoak } from "./load.js";

const [n = 10_000, warmup = 2_000] = process.argv.slice(2).map(Number);
const image = await Image.build({ ref: "builtin:busybox" });
const pool = await image.pool({ min: 1, max: 1 });
try {
  const vm = await pool.acquire();
  const result = await execSoak(vm, { n, warmup });
  await vm.release();
  process.stdout.write(JSON.stringify(result) + "\n");
} finally {
  await pool.shutdown();
}
