/** Benchmark group `streams`: throughput of the agent channel: a process's stdout and stdin streamed, and file round trips. */
import { type Vm } from "../../src/runtime/vm.js";
import { MiB, guestSetup } from "../util.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const streamsGroup: BenchGroup = {
  name: "streams",
  metrics: ["spawn_stream_mib_per_s", "spawn_stdin_mib_per_s", "write_read_file_4mib_ms"],
  sharedVm: true,
  run: async (ctx) => streamBenchmarks(ctx, await ctx.sharedVm()),
};

/**
 * Streaming throughput through the agent channel: a 64 MiB guest file `cat` to stdout and read
 * with readStdout (guest → host), 64 MiB written to a `cat > /dev/null` with writeStdin
 * (host → guest), and a 4 MiB writeFile + readFile round trip.
 */
async function streamBenchmarks(ctx: BenchContext, v: Vm): Promise<void> {
  const { quick, record } = ctx;
  const size = 64 * MiB;
  await guestSetup(v, `head -c ${size} /dev/urandom > /tmp/big`);
  const runs = quick ? 2 : 5;
  const out: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    const child = await v.spawn({ argv: ["cat", "/tmp/big"] });
    let got = 0;
    for (;;) {
      const b = await child.readStdout(MiB);
      if (b.length === 0) break;
      got += b.length;
    }
    await child.wait();
    if (got !== size) throw new Error(`read ${got} of ${size} bytes`);
    out.push(size / MiB / ((performance.now() - t0) / 1000));
  }
  record("spawn_stream_mib_per_s", out, "MiB/s");
  const chunk = Buffer.alloc(MiB, 0x61);
  const inn: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    const child = await v.spawn({ argv: ["sh", "-c", "cat > /dev/null"] });
    for (let sent = 0; sent < size; sent += MiB) await child.writeStdin(chunk);
    await child.closeStdin();
    await child.wait();
    inn.push(size / MiB / ((performance.now() - t0) / 1000));
  }
  record("spawn_stdin_mib_per_s", inn, "MiB/s");
  const data = Buffer.alloc(4 * MiB, 0x5a);
  const files: number[] = [];
  for (let i = 0; i < (quick ? 5 : 20); i++) {
    const t0 = performance.now();
    await v.writeFile("/tmp/four", data);
    const back = await v.readFile("/tmp/four");
    files.push(performance.now() - t0);
    if (back.length !== data.length) throw new Error("short read");
  }
  record("write_read_file_4mib_ms", files);
  await v.exec({ argv: ["rm", "-f", "/tmp/big", "/tmp/four"] });
}
