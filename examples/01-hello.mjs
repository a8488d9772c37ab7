// 01-hello.mjs: the smallest supermachine program, ported from @supermachine/core's first example.
// Boots the built-in busybox image in a microVM, runs `echo`, prints the output.
//
//   npm run demo        (sets up what is missing, then runs this file)
//   node examples/01-hello.mjs
import { Image } from "supermachine";

const img = await Image.build({
  ref: "builtin:busybox",
  // A stable name for this image's cache entry.
  name: "hello-busybox",
});

const pool = await img.pool({ min: 1, max: 1 });
const vm = await pool.acquire();

const { stdout, exitCode } = await vm.exec({
  argv: ["echo", "hello from supermachine"],
  timeoutMs: 5_000,
});

console.log(`exit ${exitCode}:`, stdout.toString().trim());

await vm.release();
await pool.shutdown();
