/** Benchmark group `egress`: egress through the host's proxy. */
import { Image } from "../../src/runtime/image.js";
import { MiB, connectTcp, fixtures } from "../util.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const egressGroup: BenchGroup = {
  name: "egress",
  metrics: ["egress_connect_ms", "egress_host_direct_connect_ms", "egress_mib_per_s"],
  run: (ctx) => egressBenchmarks(ctx),
};

/**
 * Egress (network: { allow }): a CONNECT through the guest's proxy port and the host's egress
 * proxy to a server on the host's loopback, timed in the guest (python3: connect, CONNECT, the
 * 200), with a direct connect on the host to the same server beside it; and a download through
 * the proxy (busybox wget, plain HTTP), timed by the guest's own exec duration.
 */
async function egressBenchmarks(ctx: BenchContext): Promise<void> {
  const { quick, record, progress } = ctx;
  const image = await ctx.busybox();
  const { createServer } = await import("node:http");
  const size = 64 * MiB;
  const big = Buffer.alloc(size, 0x61);
  const server = createServer((req, res) => {
    if (req.url === "/big") return res.end(big);
    res.end("ok\n");
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as { port: number }).port;
  const network = { allow: [`127.0.0.1:${port}`] };
  const fx = await (await fixtures()).ensureFixtures({ only: ["python"], log: progress });
  const py = await Image.build({ ref: fx.python.ref });
  const pyPool = await py.pool({ min: 1, max: 1, network });
  try {
    const v = await pyPool.acquire();
    try {
      const n = quick ? 50 : 300;
      const code = [
        "import socket, os, time, json",
        "h, p = os.environ['https_proxy'].split('//')[1].split(':')",
        `req = b'CONNECT 127.0.0.1:${port} HTTP/1.1\\r\\nHost: 127.0.0.1:${port}\\r\\n\\r\\n'`,
        "out = []",
        `for i in range(${n + 20}):`,
        "    t0 = time.perf_counter()",
        "    s = socket.create_connection((h, int(p)))",
        "    s.sendall(req)",
        "    head = b''",
        "    while b'\\r\\n\\r\\n' not in head: head += s.recv(4096)",
        "    out.append((time.perf_counter() - t0) * 1000)",
        "    assert head.startswith(b'HTTP/1.1 200'), head",
        "    s.close()",
        `print(json.dumps(out[20:]))`,
      ].join("\n");
      const r = await v.exec({ argv: ["python3", "-c", code], timeoutMs: 300_000 });
      if (r.exitCode !== 0) throw new Error(`guest CONNECT loop failed: ${r.stderr.toString().trim()}`);
      const direct: number[] = [];
      for (let i = 0; i < n + 20; i++) {
        const t0 = performance.now();
        const s = await connectTcp(`127.0.0.1:${port}`);
        direct.push(performance.now() - t0);
        s.destroy();
      }
      record("egress_connect_ms", JSON.parse(r.stdout.toString()) as number[]);
      record("egress_host_direct_connect_ms", direct.slice(20));
    } finally {
      await v.release();
    }
  } finally {
    await pyPool.shutdown();
  }
  const bbPool = await image.pool({ min: 1, max: 1, network });
  try {
    const v = await bbPool.acquire();
    try {
      const rates: number[] = [];
      for (let i = 0; i < (quick ? 2 : 5); i++) {
        const r = await v.exec({ argv: ["sh", "-c", `wget -q -O /tmp/big http://127.0.0.1:${port}/big && stat -c %s /tmp/big; rm -f /tmp/big`], timeoutMs: 300_000 });
        if (r.stdout.toString().trim() !== String(size)) throw new Error(`downloaded "${r.stdout.toString().trim()}" bytes, expected ${size}: ${r.stderr.toString().trim()}`);
        rates.push(size / MiB / (r.durationMs / 1000));
      }
      record("egress_mib_per_s", rates, "MiB/s");
    } finally {
      await v.release();
    }
  } finally {
    await bbPool.shutdown();
    server.close();
  }
}
