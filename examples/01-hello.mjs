// 01-hello.mjs: the smallest supermachine program, ported from @supermachine/core's first example.
// Boots the built-in busybox image in a microVM, runs `echo`, prints the output.
//
//   npm run demo        (sets up what is missing, then runs this file)
//   node examples/01-hello.mjs
import { Image, connect } from "supermachine";

// With SUPERMACHINE_URL (and SUPERMACHINE_API_KEY) set, the pool is the "busybox" pool of a
// `supermachine serve` there instead (docs/serve.md, "The remote client"): the rest is unchanged.
const pool = process.env.SUPERMACHINE_URL
  ? (await connect(process.env.SUPERMACHINE_URL)).busybox
  : await (await Image.build({ ref: "builtin:busybox", name: "hello-busybox" /* a stable name for its cache entry */ })).pool({ min: 1, max: 1 });
const vm = await pool.acquire();

const { stdout, exitCode } = await vm.exec({
  argv: ["echo", "hello from supermachine"],
  timeoutMs: 5_000,
});

console.log(`exit ${exitCode}:`, stdout.toString().trim());

await vm.release();
await pool.shutdown();
