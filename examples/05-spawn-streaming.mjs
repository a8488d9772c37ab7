// 05-spawn-streaming.mjs: processes whose input and output stream while they run.
// 1. Output as it is produced: `child.stdout` is a Node Readable (here read line by line).
// 2. A conversation over stdin/stdout: `writeStdin`, `readStdout`, `closeStdin`.
// 3. A terminal: `tty: true` with an initial size, then `resize()`; `stty size` sees both.
// `wait()` gives how each process ended.
//
//   node examples/05-spawn-streaming.mjs
import { createInterface } from "node:readline";
import { Image, connect } from "supermachine";

// With SUPERMACHINE_URL (and SUPERMACHINE_API_KEY) set, the pool is the "busybox" pool of a
// `supermachine serve` there instead (docs/serve.md, "The remote client"): the rest is unchanged.
const pool = process.env.SUPERMACHINE_URL
  ? (await connect(process.env.SUPERMACHINE_URL)).busybox
  : await (await Image.build({ ref: "builtin:busybox" })).pool({ min: 1, max: 1 });
const vm = await pool.acquire();
try {
  // 1. Lines arrive one by one, 200 ms apart, not all at the end.
  console.log("streamed output:");
  const t0 = Date.now();
  const ticker = await vm.spawn({ argv: ["sh", "-c", "for i in 1 2 3 4 5; do echo tick $i; sleep 0.2; done"] });
  for await (const line of createInterface({ input: ticker.stdout })) {
    console.log(`  +${String(Date.now() - t0).padStart(4)} ms  ${line}`);
  }
  const done = await ticker.wait();
  console.log(`  exit ${done.exitCode} after ${Math.round(done.durationMs)} ms in the guest`);

  // 2. One line in, one line out, for as long as stdin stays open.
  console.log("stdin conversation:");
  const shout = await vm.spawn({ argv: ["sh", "-c", 'while read -r line; do echo "$line" | tr a-z A-Z; done; echo bye'] });
  for (const line of ["hello", "streaming stdin"]) {
    await shout.writeStdin(`${line}\n`);
    console.log(`  sent "${line}", got "${(await shout.readStdout()).toString().trim()}"`);
  }
  await shout.closeStdin(); // the loop's `read` sees end of file
  const last = (await shout.readStdout()).toString().trim();
  console.log(`  after closeStdin: "${last}", exit ${(await shout.wait()).exitCode}`);

  // 3. On a terminal: the size given at spawn, then the size after resize().
  console.log("terminal:");
  const term = await vm.spawn({
    argv: ["sh", "-c", "stty -echo; stty size; read _; stty size"], // `stty size` prints "rows cols"
    tty: true,
    winsize: { cols: 100, rows: 30 },
  });
  let screen = "";
  while (!screen.includes("\n")) {
    const chunk = await term.readStdout();
    if (chunk.length === 0) throw new Error(`the terminal closed early: ${JSON.stringify(screen)}`);
    screen += chunk.toString();
  }
  await term.resize(132, 43);
  await term.writeStdin("\n"); // let it go on to the second `stty size`
  for (let chunk; (chunk = await term.readStdout()).length > 0; ) screen += chunk.toString();
  const [before, after] = screen.trim().split(/\r?\n/);
  console.log(`  stty size with winsize { cols: 100, rows: 30 }: ${before}`);
  console.log(`  stty size after resize(132, 43): ${after}`);
  console.log(`  exit ${(await term.wait()).exitCode}`);
} finally {
  await vm.release();
  await pool.shutdown();
}
