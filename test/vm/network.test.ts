// Egress on real microVMs (issue 12): the guest has no network device; with `network: { allow }`
// its processes reach the outside world through the agent's proxy port and the host's egress
// proxy, and only what the allowlist names. The outside world here is an HTTP server on the
// host's loopback (so reaching it also needs its IP listed: a name that resolves to a private
// address is refused otherwise), plus a raw TCP server that holds connections open.
import { createServer as createHttpServer, type Server as HttpServer } from "node:http";
import { createServer as createNetServer, type Server as NetServer, type Socket } from "node:net";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Image, type Pool, type PoolOptions } from "../../src/index.js";
import { readSnapshotMeta } from "../../src/store/snapshots.js";
// @ts-expect-error plain JavaScript helpers without types
import { ensureFixtures } from "../fixtures/build-fixtures.mjs";

let web: HttpServer;
let webPort = 0;
/** Requests the web server saw, in order ("GET /path"). */
const seen: string[] = [];
let hold: NetServer;
let holdPort = 0;
/** Connections the holding server has open now, and the most it ever had at once. */
let holding = 0;
let holdingMax = 0;
const held = new Set<Socket>();
let busybox: Image;
let python: Image;
let snapshotsDir: string;
const pools: Pool[] = [];

const BIG = 4 * 1024 * 1024;
const bigBody = Buffer.alloc(BIG, "x");

beforeAll(async () => {
  web = createHttpServer((req, res) => {
    seen.push(`${req.method} ${req.url}`);
    if (req.url === "/hello") return res.end(`hello from the host (Host: ${req.headers.host})\n`);
    if (req.url === "/data.txt") return res.end("baked by the warmup\n");
    if (req.url === "/big") return res.end(bigBody);
    // (busybox wget 1.35 sends its --post-file body with GET when it goes through a proxy)
    if (req.url === "/upload") {
      let n = 0;
      req.on("data", (c: Buffer) => (n += c.length));
      req.on("end", () => res.end(`got ${n} bytes\n`));
      return;
    }
    res.statusCode = 404;
    res.end("not here\n");
  });
  await new Promise<void>((r) => web.listen(0, "127.0.0.1", r));
  webPort = (web.address() as { port: number }).port;
  hold = createNetServer((s) => {
    held.add(s);
    holding++;
    holdingMax = Math.max(holdingMax, holding);
    s.on("data", () => {});
    s.on("error", () => {});
    s.on("close", () => {
      held.delete(s);
      holding--;
    });
    s.write("held\n");
  });
  await new Promise<void>((r) => hold.listen(0, "127.0.0.1", r));
  holdPort = (hold.address() as { port: number }).port;

  snapshotsDir = mkdtempSync(join(tmpdir(), "sm-network-test-"));
  busybox = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
  const fx = (await ensureFixtures({ only: ["python"] })) as { python: { ref: string } };
  python = await Image.build({ ref: fx.python.ref, snapshotsDir, name: "py" });
}, 600_000);

afterAll(async () => {
  await Promise.all(pools.map((p) => p.shutdown()));
  for (const s of held) s.destroy();
  await new Promise((r) => web.close(r));
  await new Promise((r) => hold.close(r));
  rmSync(snapshotsDir, { recursive: true, force: true });
});

async function pool(image: Image, network: PoolOptions["network"]): Promise<Pool> {
  const p = await image.pool({ min: 1, max: 2, network });
  pools.push(p);
  return p;
}

/** python3 -c <code>, its stdout (and stderr on failure in the message). */
async function py(p: Pool, code: string): Promise<{ out: string; err: string; exit: number }> {
  const vm = await p.acquire();
  try {
    const r = await vm.exec({ argv: ["python3", "-c", code], timeoutMs: 60_000 });
    return { out: r.stdout.toString(), err: r.stderr.toString(), exit: r.exitCode };
  } finally {
    await vm.release();
  }
}

/** urllib through the proxy variables: prints "<status> <body>" (an HTTPError's too). */
const fetchPy = (url: string) => `
import urllib.request, urllib.error
try:
    r = urllib.request.urlopen(${JSON.stringify(url)}, timeout=30)
    print(r.status, r.read().decode(), end="")
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode(), end="")
`;

/** An explicit CONNECT through the guest's proxy (http.client's tunnel), then a GET inside it. */
const tunnelPy = (host: string, port: number, path: string) => `
import http.client, os
proxy = os.environ["https_proxy"].split("//")[1]
h, p = proxy.split(":")
c = http.client.HTTPConnection(h, int(p), timeout=30)
c.set_tunnel(${JSON.stringify(host)}, ${port})
try:
    c.request("GET", ${JSON.stringify(path)})
    r = c.getresponse()
    print(r.status, r.read().decode(), end="")
except OSError as e:
    print("tunnel refused:", e)
`;

describe("network: { allow }", () => {
  it("reaches an allowed name over plain HTTP (wget, urllib) and over CONNECT, and counts it in netStats", { timeout: 180_000 }, async () => {
    const network = { allow: [`index.test:${webPort}`, `127.0.0.1:${webPort}`], hosts: { "index.test": "127.0.0.1" } };
    const bb = await pool(busybox, network);
    const vm = await bb.acquire();
    try {
      const env = await vm.exec({ argv: ["sh", "-c", "echo $http_proxy $HTTPS_PROXY $no_proxy"] });
      expect(env.stdout.toString()).toBe("http://127.0.0.1:3128 http://127.0.0.1:3128 localhost,127.0.0.1,::1\n");
      // The guest still has no network device: only the loopback.
      const links = await vm.exec({ argv: ["sh", "-c", "ls /sys/class/net"] });
      expect(links.stdout.toString().trim()).toBe("lo");

      const get = await vm.exec({ argv: ["wget", "-q", "-O", "-", `http://index.test:${webPort}/hello`], timeoutMs: 30_000 });
      expect(get.stderr.toString()).toBe("");
      expect(get.stdout.toString()).toBe(`hello from the host (Host: index.test:${webPort})\n`);
      // 4 MiB down and 1 MiB up, checked at both ends.
      const big = await vm.exec({ argv: ["sh", "-c", `wget -q -O - http://index.test:${webPort}/big | wc -c`], timeoutMs: 60_000 });
      expect(big.stdout.toString().trim()).toBe(String(BIG));
      const up = await vm.exec({ argv: ["sh", "-c", `yes abcdefghijklmno | head -c 1048576 > /tmp/up && wget -q -O - --post-file /tmp/up http://index.test:${webPort}/upload`], timeoutMs: 60_000 });
      expect(up.stdout.toString()).toBe("got 1048576 bytes\n");
      const n = vm.netStats();
      expect(n.connections).toBe(3);
      expect(n.refused).toBe(0);
      expect(n.bytesIn).toBeGreaterThan(BIG);
      expect(n.bytesOut).toBeGreaterThan(1024 * 1024);
    } finally {
      await vm.release();
    }

    const pp = await pool(python, network);
    const viaUrllib = await py(pp, fetchPy(`http://index.test:${webPort}/hello`));
    expect(viaUrllib.err).toBe("");
    expect(viaUrllib.out).toBe(`200 hello from the host (Host: index.test:${webPort})\n`);
    const viaConnect = await py(pp, tunnelPy("index.test", webPort, "/hello"));
    expect(viaConnect.err).toBe("");
    expect(viaConnect.out).toBe(`200 hello from the host (Host: index.test:${webPort})\n`);
  });

  it("answers 403 naming the host and the option for a name not on the list, and for a name that resolves to loopback unless its IP is listed", { timeout: 180_000 }, async () => {
    const pp = await pool(python, { allow: [`index.test:${webPort}`, "*.example.org"], hosts: { "index.test": "127.0.0.1", "other.test": "127.0.0.1" } });
    const other = await py(pp, fetchPy(`http://other.test:${webPort}/hello`));
    expect(other.out).toMatch(/^403 /);
    expect(other.out).toContain(`other.test:${webPort}`);
    expect(other.out).toContain("network.allow");
    // Listed by name, but the name resolves to the host's loopback: refused, naming the address.
    const loop = await py(pp, fetchPy(`http://index.test:${webPort}/hello`));
    expect(loop.out).toMatch(/^403 /);
    expect(loop.out).toContain("127.0.0.1");
    // The same over CONNECT.
    const tunnel = await py(pp, tunnelPy("other.test", webPort, "/hello"));
    expect(tunnel.out).toMatch(/tunnel refused:.*403/);
    // The real resolver's "localhost" is loopback as well (busybox wget ignores no_proxy).
    const bb = await pool(busybox, { allow: [`localhost:${webPort}`] });
    const vm = await bb.acquire();
    try {
      const r = await vm.exec({ argv: ["wget", "-q", "-O", "-", `http://localhost:${webPort}/hello`], timeoutMs: 30_000 });
      expect(r.exitCode).not.toBe(0);
      expect(r.stderr.toString()).toMatch(/403/);
      expect(vm.netStats().refused).toBe(1);
    } finally {
      await vm.release();
    }
    expect(seen.filter((s) => s === "GET /hello").length).toBeGreaterThan(0);
  });

  it("holds the cap on concurrent connections (429 beyond it) and serves again once one closes", { timeout: 180_000 }, async () => {
    holdingMax = 0;
    const pp = await pool(python, { allow: [`127.0.0.1:${holdPort}`], maxConnections: 2 });
    const code = `
import socket, os, time
h, p = os.environ["http_proxy"].split("//")[1].split(":")
def tunnel():
    s = socket.create_connection((h, int(p)), timeout=30)
    s.sendall(b"CONNECT 127.0.0.1:${holdPort} HTTP/1.1\\r\\nHost: 127.0.0.1:${holdPort}\\r\\n\\r\\n")
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        b = s.recv(1)
        if not b: break
        head += b
    return s, head.split(b" ")[1].decode()
a, sa = tunnel()
b, sb = tunnel()
c, sc = tunnel()
print(sa, sb, sc)
c.close()
a.close()
time.sleep(0.5)
d, sd = tunnel()
print(sd)
`;
    const r = await py(pp, code);
    expect(r.err).toBe("");
    expect(r.out).toBe("200 200 429\n200\n");
    expect(holdingMax).toBe(2);
  });
});

describe('network: "none" (the default)', () => {
  it("reaches nothing: no proxy variables, no listener, no route", { timeout: 120_000 }, async () => {
    const bb = await pool(busybox, "none");
    const vm = await bb.acquire();
    try {
      const env = await vm.exec({ argv: ["sh", "-c", "env | grep -i proxy; true"] });
      expect(env.stdout.toString()).toBe("");
      // Even pointed at the proxy port by hand, or straight at the host's address.
      const viaPort = await vm.exec({ argv: ["sh", "-c", `http_proxy=http://127.0.0.1:3128 wget -q -T 5 -O - http://127.0.0.1:${webPort}/hello`], timeoutMs: 30_000 });
      expect(viaPort.exitCode).not.toBe(0);
      const direct = await vm.exec({ argv: ["sh", "-c", `wget -q -T 5 -O - http://10.0.2.2:${webPort}/hello`], timeoutMs: 30_000 });
      expect(direct.exitCode).not.toBe(0);
      expect(direct.stdout.toString()).toBe("");
      expect(vm.netStats()).toEqual({ connections: 0, active: 0, refused: 0, refusedBy: {}, failed: 0, bytesIn: 0, bytesOut: 0, dnsQueries: 0, dnsRefused: 0 });
    } finally {
      await vm.release();
    }
  });
});

describe("network for a warmup", () => {
  it("bakes what the warmup fetched into the snapshot; the network is part of the key; pools start without it", { timeout: 300_000 }, async () => {
    const before = seen.filter((s) => s === "GET /data.txt").length;
    const network = { allow: [`127.0.0.1:${webPort}`] };
    const build = () =>
      Image.build({
        ref: "builtin:busybox",
        snapshotsDir,
        name: "warm-net",
        network,
        warmup: async (vm) => {
          const r = await vm.exec({ argv: ["wget", "-q", "-O", "/opt-data.txt", `http://127.0.0.1:${webPort}/data.txt`], timeoutMs: 30_000 });
          if (r.exitCode !== 0) throw new Error(`wget failed: ${r.stderr.toString()}`);
        },
      });
    const image = await build();
    expect(seen.filter((s) => s === "GET /data.txt").length).toBe(before + 1);
    expect((await readSnapshotMeta(image.snapshotPath))!.inputs.network).toEqual({ allow: [`127.0.0.1:${webPort}`], hosts: {}, maxConnections: 32, maxBytes: 4 * 1024 ** 3, mode: "transparent" });
    const p = await image.pool({ min: 1, max: 1 });
    pools.push(p);
    const vm = await p.acquire();
    try {
      expect((await vm.exec({ argv: ["cat", "/opt-data.txt"] })).stdout.toString()).toBe("baked by the warmup\n");
      // The pool's default is "none": the warmup's egress did not survive the snapshot.
      const env = await vm.exec({ argv: ["sh", "-c", "env | grep -i proxy; true"] });
      expect(env.stdout.toString()).toBe("");
      const again = await vm.exec({ argv: ["sh", "-c", `http_proxy=http://127.0.0.1:3128 wget -q -T 5 -O - http://127.0.0.1:${webPort}/data.txt`], timeoutMs: 30_000 });
      expect(again.exitCode).not.toBe(0);
    } finally {
      await vm.release();
    }
    // Cached: no second fetch. Another allowlist is another key: baked again.
    const cached = await build();
    expect(cached.inputHash).toBe(image.inputHash);
    expect(seen.filter((s) => s === "GET /data.txt").length).toBe(before + 1);
    network.allow.push("example.org");
    const other = await build();
    expect(other.inputHash).not.toBe(image.inputHash);
    expect(seen.filter((s) => s === "GET /data.txt").length).toBe(before + 2);
  });
});
