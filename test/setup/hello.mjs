// The first program of a project that installed supermachine (copied into the test and bench
// projects by test/setup/*.test.ts and bench/run.ts): prints "exit 0: hello".
import { Image } from "supermachine";
const img = await Image.build({ ref: "builtin:busybox" });
const pool = await img.pool({ min: 1, max: 1 });
const vm = await pool.acquire();
const r = await vm.exec({ argv: ["echo", "hello"], timeoutMs: 30_000 });
console.log(`exit ${r.exitCode}: ${r.stdout.toString().trim()}`);
await vm.release();
await pool.shutdown();
