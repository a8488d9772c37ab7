/** Benchmark group `egress`: egress through the host's policy, in proxy mode and in transparent mode. */
import { connect } from "node:net";
import { Image } from "../../src/runtime/image.js";
import type { Vm } from "../../src/runtime/vm.js";
import type { NetworkOption } from "../../src/schema/network.js";
import { MiB, fixtures, memoryOf } from "../util.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const egressGroup: BenchGroup = {
  name: "egress",
  metrics: [
    "egress_connect_ms",
    "egress_transparent_connect_ms",
    "egress_host_direct_connect_ms",
    "egress_mib_per_s",
    "egress_transparent_mib_per_s",
    "egress_idle_pss_off_mib",
    "egress_idle_pss_on_mib",
    "egress_acquire_none_ms",
    "egress_acquire_proxy_ms",
    "egress_acquire_transparent_ms",
  ],
  run: (ctx) => egressBenchmarks(ctx),
};

/** The name the guest uses for the host's server (`hosts` maps it to 127.0.0.1). */
const NAME = "bench.internal";
/** The proxy variables a guest process gets with egress on; transparent runs go without them. */
const NO_PROXY_ENV = ["env", "-u", "http_proxy", "-u", "HTTP_PROXY", "-u", "https_proxy", "-u", "HTTPS_PROXY", "-u", "all_proxy", "-u", "ALL_PROXY"];

/**
 * Egress (network: { allow }) to a server on the host's loopback that the guest names
 * bench.internal. One request is a TCP connection, `GET /` and the first bytes of the answer:
 * - egress_connect_ms: in a `mode: "proxy"` VM, python connects to the proxy port, sends
 *   `CONNECT bench.internal:port`, reads the 200, sends the GET and reads the answer's first bytes;
 * - egress_transparent_connect_ms: in a transparent VM, python resolves the name once (the agent's
 *   fake address), then per request connects to it directly, no proxy variables;
 * - egress_host_direct_connect_ms: the same request on the host, straight to 127.0.0.1, the floor.
 * Timed in the guest (time.perf_counter), 20 warm-up requests left out. Throughput: busybox wget of
 * 64 MiB (plain HTTP) through the proxy (`egress_mib_per_s`, a `mode: "proxy"` VM) and directly
 * (`egress_transparent_mib_per_s`, no proxy variables), in turn on two VMs alive together, timed
 * by the guest's exec duration. Memory: the PSS of idle busybox VMs of one snapshot with egress off
 * and on (transparent, armed), all alive together so that the shared pages split evenly.
 * Acquire: `pool.acquire()` of a restored, idle VM (the pool given time to restore between
 * cycles) with network "none", in proxy mode and in transparent mode: what egress adds to a
 * checkout (the host's proxy and DNS, the agent's listener and, transparent, its arming).
 */
async function egressBenchmarks(ctx: BenchContext): Promise<void> {
  const { quick, record, recordValue, progress } = ctx;
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
  const base = { allow: [`${NAME}:${port}`, `127.0.0.1:${port}`], hosts: { [NAME]: "127.0.0.1" } };
  const proxyNet = { ...base, mode: "proxy" as const };
  const transparentNet = { ...base, mode: "transparent" as const };
  try {
    // ---- connect + request + first bytes ----
    const n = quick ? 50 : 300;
    const fx = await (await fixtures()).ensureFixtures({ only: ["python"], log: progress });
    const py = await Image.build({ ref: fx.python.ref });
    const get = `GET / HTTP/1.1\\r\\nHost: ${NAME}:${port}\\r\\nConnection: close\\r\\n\\r\\n`;
    const loop = (setup: string[], once: string[]) =>
      [
        "import socket, os, time, json",
        `get = b'${get}'`,
        ...setup,
        "def once():",
        ...once.map((l) => `    ${l}`),
        "    first = s.recv(4096)",
        "    assert first.startswith(b'HTTP/1.1 200'), first",
        "    s.close()",
        "out = []",
        `for i in range(${n + 20}):`,
        "    t0 = time.perf_counter()",
        "    once()",
        "    out.append((time.perf_counter() - t0) * 1000)",
        "print(json.dumps(out[20:]))",
      ].join("\n");
    const viaConnect = loop(
      ["h, p = os.environ['http_proxy'].split('//')[1].rstrip('/').split(':')", `tunnel = b'CONNECT ${NAME}:${port} HTTP/1.1\\r\\nHost: ${NAME}:${port}\\r\\n\\r\\n'`],
      [
        "s = socket.create_connection((h, int(p)))",
        "s.sendall(tunnel)",
        "head = b''",
        "while b'\\r\\n\\r\\n' not in head:",
        "    c = s.recv(4096)",
        "    assert c, head",
        "    head += c",
        "assert head.startswith(b'HTTP/1.1 200'), head",
        "s.sendall(get)",
      ],
    );
    const direct = loop(
      // Resolved once: the agent's fake address for the name, which each connection carries back.
      [`addr = socket.getaddrinfo('${NAME}', ${port}, socket.AF_INET, socket.SOCK_STREAM)[0][4]`],
      ["s = socket.create_connection(addr)", "s.sendall(get)"],
    );
    const guestLoop = async (network: NetworkOption, argv: string[], what: string): Promise<number[]> => {
      const pool = await py.pool({ min: 1, max: 1, network });
      try {
        const v = await pool.acquire();
        try {
          const r = await v.exec({ argv, timeoutMs: 300_000 });
          if (r.exitCode !== 0) throw new Error(`guest ${what} loop failed: ${r.stderr.toString().trim()}`);
          return JSON.parse(r.stdout.toString()) as number[];
        } finally {
          await v.release();
        }
      } finally {
        await pool.shutdown();
      }
    };
    const proxied = await guestLoop(proxyNet, ["python3", "-c", viaConnect], "CONNECT");
    const transparent = await guestLoop(transparentNet, [...NO_PROXY_ENV, "python3", "-c", direct], "transparent");
    const host: number[] = [];
    for (let i = 0; i < n + 20; i++) host.push(await hostRequest(port));
    record("egress_connect_ms", proxied);
    record("egress_transparent_connect_ms", transparent);
    record("egress_host_direct_connect_ms", host.slice(20));

    // ---- throughput ----
    const proxyPool = await image.pool({ min: 1, max: 1, network: proxyNet });
    const transparentPool = await image.pool({ min: 1, max: 1, network: transparentNet });
    try {
      const pv = await proxyPool.acquire();
      const tv = await transparentPool.acquire();
      try {
        const url = `http://${NAME}:${port}/big`;
        const proxyRates: number[] = [];
        const directRates: number[] = [];
        const download = async (v: Vm, prefix: string[]) => {
          const r = await v.exec({ argv: [...prefix, "sh", "-c", `wget -q -O /tmp/big ${url} && stat -c %s /tmp/big; rm -f /tmp/big`], timeoutMs: 300_000 });
          if (r.stdout.toString().trim() !== String(size)) throw new Error(`downloaded "${r.stdout.toString().trim()}" bytes, expected ${size}: ${r.stderr.toString().trim()}`);
          return size / MiB / (r.durationMs / 1000);
        };
        for (let i = 0; i < (quick ? 2 : 5); i++) {
          proxyRates.push(await download(pv, []));
          directRates.push(await download(tv, NO_PROXY_ENV));
        }
        // Each download in proxy mode went through the proxy (nothing else reaches the host there);
        // the transparent ones asked DNS for the name and connected without it.
        const ps = pv.netStats();
        const ts = tv.netStats();
        if (ps.connections < proxyRates.length) throw new Error(`proxy-mode VM: ${ps.connections} connections for ${proxyRates.length} downloads`);
        if (ts.dnsQueries < 1 || ts.connections < directRates.length) throw new Error(`transparent VM: ${ts.dnsQueries} DNS queries, ${ts.connections} connections for ${directRates.length} downloads`);
        record("egress_mib_per_s", proxyRates, "MiB/s");
        record("egress_transparent_mib_per_s", directRates, "MiB/s");
        const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.ceil(xs.length / 2) - 1]!;
        progress(`egress_transparent_mib_per_s / egress_mib_per_s (p50): ${(median(directRates) / median(proxyRates)).toFixed(2)}`);
      } finally {
        await pv.release();
        await tv.release();
      }
    } finally {
      await proxyPool.shutdown();
      await transparentPool.shutdown();
    }

    // ---- idle memory, egress off and on ----
    const count = quick ? 2 : 4;
    const offPool = await image.pool({ min: 0, max: count, restoreOnRelease: false });
    const onPool = await image.pool({ min: 0, max: count, restoreOnRelease: false, network: transparentNet });
    try {
      const off: Vm[] = [];
      const on: Vm[] = [];
      for (let i = 0; i < count; i++) {
        off.push(await offPool.acquire());
        on.push(await onPool.acquire());
      }
      await new Promise((r) => setTimeout(r, 2_000));
      const mean = (vms: Vm[]) => vms.map((v) => memoryOf(v.pid).pss).reduce((a, b) => a + b, 0) / vms.length;
      recordValue("egress_idle_pss_off_mib", mean(off), count, "MiB");
      recordValue("egress_idle_pss_on_mib", mean(on), count, "MiB");
      await Promise.all([...off, ...on].map((v) => v.release()));
    } finally {
      await offPool.shutdown();
      await onPool.shutdown();
    }

    // ---- acquire of an idle VM, egress off, proxy, transparent ----
    const cycles = quick ? 4 : 12;
    for (const [metric, network] of [
      ["egress_acquire_none_ms", "none"],
      ["egress_acquire_proxy_ms", proxyNet],
      ["egress_acquire_transparent_ms", transparentNet],
    ] as const) {
      const p = await image.pool({ min: 2, max: 2, network });
      try {
        const times: number[] = [];
        for (let i = 0; i < cycles + 2; i++) {
          await idle(p, 2);
          const t0 = performance.now();
          const vm = await p.acquire();
          times.push(performance.now() - t0);
          await vm.release();
        }
        record(metric, times.slice(2));
      } finally {
        await p.shutdown();
      }
    }
  } finally {
    server.close();
  }
}

/** Waits (30 s at most) until `pool` has `n` VMs restored and idle, so an acquire takes one at once. */
async function idle(pool: { stats(): { idle: number } }, n: number): Promise<void> {
  const until = Date.now() + 30_000;
  while (pool.stats().idle < n && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
  if (pool.stats().idle < n) throw new Error(`the pool has ${pool.stats().idle} idle VMs after 30 s, expected ${n}`);
}

/** On the host: connect to 127.0.0.1:port, send the GET, wait for the first bytes; milliseconds. */
function hostRequest(port: number): Promise<number> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const s = connect({ host: "127.0.0.1", port }, () => s.write(`GET / HTTP/1.1\r\nHost: ${NAME}:${port}\r\nConnection: close\r\n\r\n`));
    s.once("data", (d: Buffer) => {
      const ms = performance.now() - t0;
      s.destroy();
      if (!d.toString("latin1").startsWith("HTTP/1.1 200")) reject(new Error(`host request: ${d.toString("latin1").slice(0, 80)}`));
      else resolve(ms);
    });
    s.once("error", reject);
  });
}
