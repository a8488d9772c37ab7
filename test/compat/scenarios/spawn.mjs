// Spawn streaming with backpressure both ways: a guest writer that nobody reads is held back
// (it blocks, the host buffers a bounded amount), and reading resumes it with every byte intact;
// stdin written through the Writable respects its `drain`.
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { assert, busyboxPool, report, sleep } from "./_lib.mjs";

const CHUNKS = 256; // of 64 KiB: 16 MiB
const pool = await busyboxPool();
const vm = await pool.acquire();
try {
  const progress = async () => Number((await vm.exec({ argv: ["sh", "-c", "cat /tmp/progress 2>/dev/null || echo 0"] })).stdout.toString());
  const writer = await vm.spawn({
    argv: ["sh", "-c", `i=0; while [ $i -lt ${CHUNKS} ]; do head -c 65536 /dev/zero; i=$((i+1)); echo $i > /tmp/progress; done`],
  });
  // Nothing reads stdout: the writer must come to a stop well short of the end. It is polled
  // until it has not moved for a second (a loaded host may take a while to fill the buffers).
  let first = await progress();
  let stillFor = 0;
  for (const t0 = Date.now(); stillFor < 1_000 && Date.now() - t0 < 20_000; ) {
    await sleep(250);
    const now = await progress();
    stillFor = now === first && now > 0 ? stillFor + 250 : 0; // it has to have started
    first = now;
  }
  assert.ok(stillFor >= 1_000, `the unread writer never stopped (at chunk ${first} of ${CHUNKS} after 20 s)`);
  assert.ok(first < CHUNKS / 2, `the unread writer stopped only at chunk ${first} of ${CHUNKS}: not held back`);
  // Reading lets it finish, and every byte arrives.
  let bytes = 0;
  let wrong = 0;
  for await (const c of writer.stdout) {
    bytes += c.length;
    for (const b of c) if (b !== 0) wrong++;
  }
  const done = await writer.wait();
  assert.equal(done.exitCode, 0);
  assert.equal(bytes, CHUNKS * 65536);
  assert.equal(wrong, 0);
  assert.equal(await progress(), CHUNKS);

  // stdin: 8 MiB through the Writable, with its backpressure, counted by the guest.
  const counter = await vm.spawn({ argv: ["wc", "-c"] });
  const out = [];
  counter.stdout.on("data", (c) => out.push(c));
  const chunk = Buffer.alloc(65536, 0x61);
  await pipeline(
    Readable.from((function* () {
      for (let i = 0; i < 128; i++) yield chunk;
    })()),
    counter.stdin,
  );
  const counted = await counter.wait();
  assert.equal(counted.exitCode, 0);
  assert.equal(Buffer.concat(out).toString().trim(), String(128 * 65536));
  report({ scenario: "spawn", heldAtChunk: first, bytesOut: bytes, bytesIn: 128 * 65536 });
} finally {
  await vm.release();
  await pool.shutdown();
}
