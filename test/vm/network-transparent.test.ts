// Transparent egress on real microVMs (issue 21): with `network: { allow }` every TCP connection
// a guest program opens, and every DNS query it makes, goes through the host's policy, whatever
// the program; the proxy variables are not needed. Each client here runs with them removed, so
// nothing it does can take the proxy port.
//
// The outside world is a set of servers on the host's 127.0.0.1 (plain HTTP, HTTPS with a
// throwaway certificate for secure.test, a raw TCP server that holds connections open). In the
// guest, 127.0.0.0/8 is the guest's own loopback, so these servers are reached only by name
// (`hosts` maps the names to 127.0.0.1, and the allowlist lists that IP with the port, as a name
// resolving to loopback needs). Nothing here connects to the real internet: the refused
// destinations (TEST-NET, private, metadata addresses) are refused by policy before any connect.
//
// Each test fails without the feature: without steering the direct clients get "network
// unreachable", without the DNS responder names do not resolve, without the policy the refused
// targets would hang or succeed, and the counters name the reason of every refusal (ICMP has a
// control: the same ping succeeds once the agent's setting is undone). Host lookups are counted
// with a lower-level rig (GuestEgress with a resolver spy on a VM whose pool has no network),
// which also drives DNS rebinding with a 1-second TTL. Beyond that: a snapshot taken with egress
// on and restored twice (and once without network), the caps, "none", and proxy mode.
//
// VMs are few and reused (TCG is slow): one busybox and one python VM for most tests, one node VM,
// the restores, a python VM with small caps, a busybox VM without network for the rig, one in
// proxy mode. (busybox wget runs without -T: with it, this busybox crashes on ENETUNREACH.)
import { execFileSync } from "node:child_process";
import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import { createServer as createNetServer, type Server, type Socket } from "node:net";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TLSSocket } from "node:tls";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { Image, type NetworkOption, type Pool, type Vm } from "../../src/index.js";
import { parseNetwork, type ResolvedNetwork } from "../../src/schema/network.js";
import { GuestEgress } from "../../src/session/egress.js";
// @ts-expect-error plain JavaScript helpers without types
import { ensureFixtures } from "../fixtures/build-fixtures.mjs";
// @ts-expect-error plain JavaScript helpers without types
import { ensureNodeFixture } from "../fixtures/node-fixture.mjs";

// ---- the outside world (on the host's loopback) ----------------------------------------------

/** What the HTTP and HTTPS servers saw: path, Host header, TLS server name. */
const seen: { path: string; host: string | undefined; servername?: string }[] = [];
const BIG = 1024 * 1024;
const serve = (req: IncomingMessage, res: ServerResponse) => {
  const servername = (req.socket as TLSSocket).servername;
  seen.push({ path: req.url ?? "", host: req.headers.host, ...(servername ? { servername } : {}) });
  res.end(req.url === "/big" ? Buffer.alloc(BIG, "x") : `hello ${req.headers.host}\n`);
};
const sawPath = (path: string) => seen.filter((s) => s.path === path);

/** The raw TCP server: it greets each connection with "held\n" and keeps it open. */
const held = new Set<Socket>();
let heldEver = 0;
let heldMax = 0;

let certDir: string;
const servers: Server[] = [];
let webPort = 0;
let tlsPort = 0;
let holdPort = 0;
let caPem = "";

async function listen(server: Server): Promise<number> {
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return (server.address() as { port: number }).port;
}

// ---- the guest side ----------------------------------------------------------------------------

let busybox: Image;
let python: Image;
let node: Image;
const pools: Pool[] = [];
let snapDir: string;

async function pool(image: Image, network: NetworkOption, max = 1): Promise<Pool> {
  const p = await image.pool({ min: 1, max, network });
  pools.push(p);
  return p;
}

/**
 * The allowlist of most pools: the servers by name, each name mapped to the host's 127.0.0.1 (and
 * the IPs listed too, as loopback is reached only so); plus two allowed names whose addresses
 * (TEST-NET, the metadata address) are never connected to.
 */
function worldNetwork(extra: Partial<Exclude<NetworkOption, "none">> = {}): NetworkOption {
  const names: Record<string, number> = { "web.test": webPort, "alt.test": webPort, "secure.test": tlsPort, "hold.test": holdPort };
  return {
    allow: [...Object.entries(names).map(([n, p]) => `${n}:${p}`), ...[webPort, tlsPort, holdPort].map((p) => `127.0.0.1:${p}`), "ipweb.test:80", "meta.test:80"],
    hosts: { ...Object.fromEntries(Object.keys(names).map((n) => [n, "127.0.0.1"])), "ipweb.test": "203.0.113.7", "meta.test": "169.254.169.254" },
    ...extra,
  };
}

/** Every proxy variable removed, so that a client can only connect directly. */
const NO_PROXY_VARS = ["http_proxy", "https_proxy", "all_proxy", "no_proxy"].flatMap((k) => ["-u", k, "-u", k.toUpperCase()]);

interface Ran {
  out: string;
  err: string;
  exit: number;
  /** Wall time of the exec, host side (ms). */
  ms: number;
}

/** Runs argv in the guest with the proxy variables removed. */
async function direct(vm: Vm, argv: string[], timeoutMs = 60_000): Promise<Ran> {
  const t = Date.now();
  const r = await vm.exec({ argv: ["env", ...NO_PROXY_VARS, ...argv], timeoutMs });
  return { out: r.stdout.toString(), err: r.stderr.toString(), exit: r.exitCode, ms: Date.now() - t };
}

/** python3 -c with the proxy variables removed (and checked gone); PREAMBLE's helpers in scope. */
const py = (vm: Vm, code: string) => direct(vm, ["python3", "-c", PREAMBLE + code]);

/**
 * attempt(): one TCP connection (connect, send a GET for Host `asked` or `host`, read), as "<outcome> <seconds>"; outcome is
 * the reply's first line, "EOF", or the errno name. resolve(): the address a name resolves to,
 * or "gaierror".
 */
const PREAMBLE = `
import errno, os, socket, time
assert not [k for k in os.environ if k.lower().endswith("_proxy")], os.environ
def outcome(e):
    return errno.errorcode.get(e.errno, type(e).__name__) if isinstance(e, OSError) and e.errno else type(e).__name__
def attempt(host, port, family=socket.AF_INET, path="/", asked=None):
    t = time.monotonic()
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect((host, port))
        s.sendall(("GET %s HTTP/1.0\\r\\nHost: %s:%d\\r\\n\\r\\n" % (path, asked or host, port)).encode())
        data = s.recv(200)
        r = data.split(b"\\r\\n")[0].decode() if data else "EOF"
    except Exception as e:
        r = outcome(e)
    return "%s %.1f" % (r, time.monotonic() - t)
def resolve(name):
    try:
        return socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror:
        return "gaierror"
`;

/** Lines "<outcome> <seconds>" → outcomes, after checking each came within `seconds`. */
function quick(lines: string, seconds = 5): string[] {
  return lines
    .trim()
    .split("\n")
    .map((l) => {
      const cut = l.lastIndexOf(" ");
      expect(Number(l.slice(cut + 1)), l).toBeLessThan(seconds);
      return l.slice(0, cut);
    });
}

beforeAll(async () => {
  certDir = mkdtempSync(join(tmpdir(), "sm-transparent-cert-"));
  snapDir = mkdtempSync(join(tmpdir(), "sm-transparent-snap-"));
  execFileSync("openssl", [
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
    "-subj", "/CN=secure.test", "-addext", "subjectAltName=DNS:secure.test",
    "-keyout", join(certDir, "key.pem"), "-out", join(certDir, "cert.pem"),
  ], { stdio: "ignore" });
  caPem = readFileSync(join(certDir, "cert.pem"), "utf8");
  webPort = await listen(createHttpServer(serve));
  tlsPort = await listen(createHttpsServer({ key: readFileSync(join(certDir, "key.pem")), cert: caPem }, serve));
  holdPort = await listen(
    createNetServer((s) => {
      held.add(s);
      heldEver++;
      heldMax = Math.max(heldMax, held.size);
      s.on("error", () => {});
      s.on("data", () => {});
      s.on("close", () => held.delete(s));
      s.write("held\n");
    }),
  );
  busybox = await Image.build({ ref: "builtin:busybox" });
  const fx = (await ensureFixtures({ only: ["python"] })) as { python: { ref: string } };
  python = await Image.build({ ref: fx.python.ref });
  node = await Image.build({ ref: ((await ensureNodeFixture()) as { ref: string }).ref });
}, 900_000);

afterAll(async () => {
  await Promise.all(pools.map((p) => p.shutdown()));
  for (const s of held) s.destroy();
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  rmSync(certDir, { recursive: true, force: true });
  rmSync(snapDir, { recursive: true, force: true });
});

// ---- the tests ---------------------------------------------------------------------------------

describe("transparent egress: clients that know nothing of proxies", () => {
  let bb: Vm;
  let pyVm: Vm;
  beforeAll(async () => {
    bb = await (await pool(busybox, worldNetwork())).acquire();
    pyVm = await (await pool(python, worldNetwork())).acquire();
    await pyVm.writeFile("/tmp/ca.pem", caPem);
  }, 300_000);

  it("reach an allowed name: busybox wget, python urllib, http.client and a raw socket, HTTPS with SNI, Node's fetch", { timeout: 180_000 }, async () => {
    const host = `web.test:${webPort}`;
    const wget = await direct(bb, ["wget", "-q", "-O", "-", `http://${host}/wget`]);
    expect(wget.err).toBe("");
    expect(wget.out).toBe(`hello ${host}\n`);
    // The proxy port still serves the programs that use the variables.
    const proxied = await bb.exec({ argv: ["wget", "-q", "-O", "-", `http://${host}/wget-proxied`], timeoutMs: 30_000 });
    expect(proxied.stdout.toString()).toBe(`hello ${host}\n`);

    const r = await py(
      pyVm,
      `
import http.client, ssl, urllib.request
print(urllib.request.urlopen("http://${host}/urllib", timeout=30).read().decode(), end="")
c = http.client.HTTPConnection("web.test", ${webPort}, timeout=30)
c.request("GET", "/http.client")
print(c.getresponse().read().decode(), end="")
s = socket.create_connection(("web.test", ${webPort}), timeout=30)
s.sendall(b"GET /raw HTTP/1.0\\r\\nHost: ${host}\\r\\n\\r\\n")
data = b""
while True:
    b = s.recv(4096)
    if not b: break
    data += b
print(data.split(b"\\r\\n\\r\\n", 1)[1].decode(), end="")
ctx = ssl.create_default_context(cafile="/tmp/ca.pem")
print(urllib.request.urlopen("https://secure.test:${tlsPort}/tls", context=ctx, timeout=60).read().decode(), end="")
`,
    );
    expect(r.err).toBe("");
    expect(r.out).toBe(`hello ${host}\n`.repeat(3) + `hello secure.test:${tlsPort}\n`);
    for (const path of ["/wget", "/wget-proxied", "/urllib", "/http.client", "/raw"]) expect(sawPath(path), path).toEqual([{ path, host }]);
    expect(sawPath("/tls")).toEqual([{ path: "/tls", host: `secure.test:${tlsPort}`, servername: "secure.test" }]);
    const stats = pyVm.netStats();
    expect(stats.refused).toBe(0);
    expect(stats.connections).toBe(4);
    expect(stats.dnsQueries).toBeGreaterThan(0);

    const nodeVm = await (await pool(node, worldNetwork())).acquire();
    const n = await direct(nodeVm, ["node", "-e", `fetch("http://${host}/fetch").then((r) => r.text()).then((t) => process.stdout.write(t))`]);
    expect(n.err).toBe("");
    expect(n.out).toBe(`hello ${host}\n`);
    expect(sawPath("/fetch")).toEqual([{ path: "/fetch", host }]);
    expect(nodeVm.netStats()).toMatchObject({ connections: 1, refused: 0 });
  });

  it("refuses at once, with a reset: an allowed name's address asked for by IP, private and metadata addresses, IPv4-mapped IPv6, a decimal address", { timeout: 180_000 }, async () => {
    const before = pyVm.netStats();
    const r = await py(
      pyVm,
      `
print(attempt("203.0.113.7", 80))
print(attempt("10.0.0.1", 80))
print(attempt("169.254.169.254", 80))
print(attempt("::ffff:169.254.169.254", 80, socket.AF_INET6))
print(attempt("2852039166", 80))
print(resolve("meta.test"), 0)
print(resolve("evil.test"), 0)
`,
    );
    expect(r.err).toBe("");
    const outcomes = quick(r.out);
    expect(outcomes.slice(0, 5)).toEqual(Array(5).fill("ECONNRESET"));
    // meta.test is listed, but resolves to the metadata address (REFUSED); evil.test is not listed (NXDOMAIN).
    expect(outcomes.slice(5)).toEqual(["gaierror", "gaierror"]);
    const after = pyVm.netStats();
    expect((after.refusedBy["not-allowed"] ?? 0) - (before.refusedBy["not-allowed"] ?? 0)).toBe(5);
    expect(after.refused - before.refused).toBe(5);
    expect(after.failed).toBe(before.failed);
    expect(after.dnsRefused - before.dnsRefused).toBeGreaterThanOrEqual(2);

    // busybox wget, the decimal spelling too.
    const bbBefore = bb.netStats().refusedBy["not-allowed"] ?? 0;
    const w = await direct(bb, ["wget", "-q", "-O", "-", "http://2852039166/"]);
    expect(w.exit).not.toBe(0);
    expect(w.err).toMatch(/reset/i);
    expect(w.ms).toBeLessThan(8_000);
    expect(bb.netStats().refusedBy["not-allowed"]).toBe(bbBefore + 1);
  });

  it("refuses what an allowed name does not cover: another Host or TLS server name on its address, another port, a fake address its DNS never gave; UDP and IPv6 go nowhere", { timeout: 120_000 }, async () => {
    const before = pyVm.netStats();
    const r = await py(
      pyVm,
      `
import ssl
def tls(name):
    t = time.monotonic()
    ctx = ssl.create_default_context(cafile="/tmp/ca.pem")
    ctx.check_hostname = False  # another name on purpose: the certificate is secure.test's
    try:
        ctx.wrap_socket(socket.create_connection(("secure.test", ${tlsPort}), timeout=20), server_hostname=name).close()
        r = "handshake"
    except Exception as e:
        r = outcome(e)
    return "%s %.1f" % (r, time.monotonic() - t)
def udp(host, port):
    t = time.monotonic()
    try:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(5)
        u.connect((host, port))
        u.send(b"x")
        u.recv(10)
        r = "answered"
    except Exception as e:
        r = outcome(e)
    return "%s %.1f" % (r, time.monotonic() - t)
print(attempt("web.test", ${webPort}, path="/mismatch", asked="evil.test"))
print(attempt("web.test", 80))
print(tls("secure.test"))
print(tls("evil.test"))
print(attempt("198.18.255.254", 80))
print(udp("203.0.113.5", 123))
print(attempt("2001:db8::1", 80, socket.AF_INET6))
`,
    );
    expect(r.err).toBe("");
    expect(quick(r.out)).toEqual(["ECONNRESET", "ECONNRESET", "handshake", "ECONNRESET", "ECONNRESET", "ECONNREFUSED", "ENETUNREACH"]);
    const after = pyVm.netStats();
    expect((after.refusedBy["name-mismatch"] ?? 0) - (before.refusedBy["name-mismatch"] ?? 0)).toBe(2);
    expect((after.refusedBy["stale-address"] ?? 0) - (before.refusedBy["stale-address"] ?? 0)).toBe(1);
    expect((after.refusedBy["not-allowed"] ?? 0) - (before.refusedBy["not-allowed"] ?? 0)).toBe(1); // web.test on a port it is not allowed on
    expect(after.refused - before.refused).toBe(4);
    expect(sawPath("/mismatch")).toEqual([]);
  });

  it("leaves ICMP echo unanswered while egress is on", { timeout: 60_000 }, async () => {
    const ping = await direct(bb, ["ping", "-c", "1", "-W", "2", "203.0.113.5"]);
    expect(ping.exit).not.toBe(0);
    expect(ping.out).toMatch(/0 packets received/); // sent (the address is local while armed), not answered
    // The control: without the agent's setting the guest kernel answers for any address itself.
    const ignore = "/proc/sys/net/ipv4/icmp_echo_ignore_all";
    const control = await bb.exec({ argv: ["sh", "-c", `cat ${ignore}; echo 0 > ${ignore}; ping -c 1 -W 2 203.0.113.5 >/dev/null; s=$?; echo 1 > ${ignore}; exit $s`] });
    expect(control).toMatchObject({ exitCode: 0, stdout: Buffer.from("1\n") });
  });

  it("a snapshot taken with egress on: each restore loses the held connection and has DNS and counters of its own", { timeout: 300_000 }, async () => {
    // The source holds a connection to the raw server through hold.test.
    const holder = `
s = socket.create_connection(("hold.test", ${holdPort}), timeout=30)
log = open("/tmp/holder.log", "w", buffering=1)
log.write("ready %s\\n" % s.recv(5).decode().strip())
s.settimeout(0.5)
while True:
    try:
        b = s.recv(100)
        if not b:
            log.write("EOF\\n"); break
    except socket.timeout:
        try: s.send(b".")
        except Exception as e:
            log.write(outcome(e) + "\\n"); break
    except Exception as e:
        log.write(outcome(e) + "\\n"); break
`;
    await pyVm.writeFile("/tmp/holder.py", PREAMBLE + holder);
    const ever = heldEver;
    await direct(pyVm, ["sh", "-c", "(python3 /tmp/holder.py > /tmp/holder.out 2>&1 &); true"]);
    const readLog = async (vm: Vm) => (await vm.exec({ argv: ["sh", "-c", "cat /tmp/holder.log /tmp/holder.out 2>/dev/null; true"] })).stdout.toString();
    await expect.poll(() => readLog(pyVm), { timeout: 30_000, interval: 500 }).toBe("ready held\n");
    expect(heldEver).toBe(ever + 1);

    const image = await pyVm.snapshot(join(snapDir, "with-egress"));
    const clones = await pool(image, worldNetwork(), 2);
    const [a, b] = await Promise.all([clones.acquire(), clones.acquire()]);
    for (const c of [a!, b!]) {
      expect(c.netStats()).toMatchObject({ connections: 0, dnsQueries: 0 });
      // The restored holder finds its connection gone.
      await expect.poll(() => readLog(c), { timeout: 30_000, interval: 500 }).toMatch(/^ready held\n(ECONNRESET|EPIPE|EOF)\n$/);
    }
    expect(heldEver).toBe(ever + 1);

    // DNS works in each, counted for each alone.
    const one = await py(a!, `print(resolve("web.test")); print(attempt("web.test", ${webPort}, path="/clone-a"))`);
    expect(one.out).toMatch(/^198\.1[89]\.\d+\.\d+\nHTTP\/1\.1 200 OK \d/);
    const aQueries = a!.netStats().dnsQueries;
    expect(aQueries).toBeGreaterThan(0);
    const two = await py(b!, `print(resolve("alt.test")); print(attempt("alt.test", ${webPort}, path="/clone-b"))`);
    expect(two.out).toMatch(/^198\.1[89]\.\d+\.\d+\nHTTP\/1\.1 200 OK \d/);
    expect(b!.netStats().dnsQueries).toBeGreaterThan(0);
    expect(a!.netStats().dnsQueries).toBe(aQueries);
    expect(sawPath("/clone-a")).toHaveLength(1);
    expect(sawPath("/clone-b")).toHaveLength(1);
    // The source still holds its own, and still reaches the world.
    expect(await readLog(pyVm)).toBe("ready held\n");
    expect(quick((await py(pyVm, `print(attempt("web.test", ${webPort}, path="/source-after"))`)).out)).toEqual(["HTTP/1.1 200 OK"]);

    // Restored without network, the snapshot keeps none of the egress: no steering, no DNS.
    const bare = await (await pool(image, "none")).acquire();
    const none = await py(bare, `print(attempt("203.0.113.5", 80)); print(resolve("web.test"), 0)`);
    expect(quick(none.out)).toEqual(["ENETUNREACH", "gaierror"]);
  });
});

describe("transparent egress: the caps hold", () => {
  it("maxConnections: the third concurrent connection is reset at once; maxBytes: a download ends early and later connections are refused", { timeout: 240_000 }, async () => {
    const p = await pool(python, worldNetwork({ maxConnections: 2, maxBytes: 64 * 1024 }));
    const vm = await p.acquire();
    heldMax = held.size;
    const base = held.size;
    const conns = await py(
      vm,
      `
a = socket.create_connection(("hold.test", ${holdPort}), timeout=20); print(a.recv(5).decode().strip(), 0)
b = socket.create_connection(("hold.test", ${holdPort}), timeout=20); print(b.recv(5).decode().strip(), 0)
print(attempt("hold.test", ${holdPort}))
`,
    );
    expect(conns.err).toBe("");
    expect(quick(conns.out)).toEqual(["held", "held", "ECONNRESET"]);
    expect(heldMax - base).toBe(2);
    expect(vm.netStats().refusedBy.limit).toBe(1);

    const big = await py(
      vm,
      `
s = socket.create_connection(("web.test", ${webPort}), timeout=20)
s.sendall(b"GET /big HTTP/1.0\\r\\nHost: web.test:${webPort}\\r\\n\\r\\n")
n = 0
end = "EOF"
while True:
    try:
        b = s.recv(65536)
    except Exception as e:
        end = outcome(e); break
    if not b: break
    n += len(b)
print(n, end)
print(attempt("web.test", ${webPort}, path="/after"))
`,
    );
    expect(big.err).toBe("");
    const [got, after] = big.out.trim().split("\n");
    // The budget runs out mid-body: the guest gets what fitted, then a reset (not a clean end,
    // which a protocol without its own framing would take for the whole answer).
    const [n, end] = got!.split(" ");
    expect(Number(n)).toBeGreaterThan(0);
    expect(Number(n)).toBeLessThan(64 * 1024);
    expect(end).toBe("ECONNRESET");
    expect(quick(after!)).toEqual(["ECONNRESET"]);
    expect(vm.netStats().refusedBy.limit).toBe(2);
    expect(sawPath("/after")).toEqual([]);
  });
});

describe("egress rig: the host's lookups counted", () => {
  let vm: Vm;
  beforeAll(async () => {
    vm = await (await pool(busybox, "none")).acquire();
  }, 120_000);

  /** Egress on `vm` as a pool would start it, with the host's resolver replaced by `resolve`. */
  async function rig(network: NetworkOption, resolve: (name: string) => Promise<{ address: string }[]>, fn: (egress: GuestEgress) => Promise<void>) {
    const egress = await GuestEgress.start(vm.machine.agent, parseNetwork(network) as ResolvedNetwork, { resolve, ttlSeconds: 1 });
    try {
      await fn(egress);
    } finally {
      await egress.stop();
    }
  }

  it('network: "none" is still no path: no route, no DNS server', { timeout: 60_000 }, async () => {
    const w = await direct(vm, ["wget", "-q", "-O", "-", "http://203.0.113.5/"]);
    expect(w).toMatchObject({ err: expect.stringMatching(/unreachable/i) });
    for (const server of ["8.8.8.8", "127.0.0.1"]) {
      const ns = await direct(vm, ["nslookup", "web.test", server], 30_000);
      expect(ns.exit, server).not.toBe(0);
      expect(ns.out).not.toMatch(/Name:\s+web\.test/);
    }
    expect(vm.netStats()).toMatchObject({ connections: 0, dnsQueries: 0 });
  });

  it("a name not on the list: NXDOMAIN in the guest, and no lookup on the host", { timeout: 60_000 }, async () => {
    const lookups = vi.fn(async () => [{ address: "127.0.0.1" }]);
    await rig({ allow: [`ok.test:${webPort}`, `127.0.0.1:${webPort}`] }, lookups, async (egress) => {
      const evil = await direct(vm, ["nslookup", "evil.test", "8.8.8.8"]);
      expect(evil.exit).not.toBe(0);
      expect(evil.out + evil.err).toMatch(/NXDOMAIN/);
      // Other question types about it are REFUSED.
      const mx = await direct(vm, ["nslookup", "-type=mx", "evil.test", "8.8.8.8"]);
      expect(mx.out + mx.err).toMatch(/REFUSED/);
      expect(mx.out + mx.err).not.toMatch(/NXDOMAIN/);
      expect(egress.stats().dnsRefused).toBeGreaterThan(0);
      expect(lookups).not.toHaveBeenCalled();
      // The spy is the host's resolver: an allowed name is looked up through it.
      const ok = await direct(vm, ["nslookup", "ok.test", "8.8.8.8"]);
      expect(ok.out).toMatch(/Address:\s+198\.1[89]\./);
      expect(lookups.mock.calls).toEqual([["ok.test"]]);
    });
  });

  it("DNS rebinding: once the answer expires and now points at another loopback address, connections and lookups are refused", { timeout: 60_000 }, async () => {
    let calls = 0;
    const lookups = vi.fn(async () => [{ address: calls++ === 0 ? "127.0.0.1" : "127.0.0.2" }]);
    await rig({ allow: [`rebind.test:${webPort}`, `127.0.0.1:${webPort}`] }, lookups, async (egress) => {
      const first = await direct(vm, ["wget", "-q", "-O", "-", `http://rebind.test:${webPort}/rebind-1`]);
      expect(first.err).toBe("");
      expect(first.out).toBe(`hello rebind.test:${webPort}\n`);
      const fake = /Address:\s+(198\.1[89]\.\d+\.\d+)/.exec((await direct(vm, ["nslookup", "rebind.test", "8.8.8.8"])).out)?.[1];
      expect(fake).toBeDefined();
      await new Promise((r) => setTimeout(r, 1_500));
      // The guest still holds the fake address; a connection to it is checked again: refused.
      const second = await direct(vm, ["wget", "-q", "-O", "-", `http://${fake}:${webPort}/rebind-2`]);
      expect(second).toMatchObject({ exit: 1, err: expect.stringMatching(/reset/i) });
      expect(second.ms).toBeLessThan(8_000);
      expect(egress.stats()).toMatchObject({ refusedBy: { "private-address": 1 } });
      const again = await direct(vm, ["nslookup", "rebind.test", "8.8.8.8"]);
      expect(again.exit).not.toBe(0);
      expect(egress.stats().dnsRefused).toBeGreaterThan(0);
      expect(sawPath("/rebind-1")).toHaveLength(1);
      expect(sawPath("/rebind-2")).toEqual([]);
      expect(lookups.mock.calls.length).toBeGreaterThanOrEqual(2);
    });
  });
});

describe('mode: "proxy"', () => {
  it("a program that ignores the proxy variables resolves and reaches nothing; wget through them still works", { timeout: 120_000 }, async () => {
    const vm = await (await pool(busybox, worldNetwork({ mode: "proxy" }))).acquire();
    const byName = await direct(vm, ["wget", "-q", "-O", "-", `http://web.test:${webPort}/proxy-direct`]);
    expect(byName).toMatchObject({ err: expect.stringMatching(/bad address/i) });
    const ns = await direct(vm, ["nslookup", "web.test", "8.8.8.8"], 30_000);
    expect(ns.exit).not.toBe(0);
    const byIp = await direct(vm, ["wget", "-q", "-O", "-", "http://203.0.113.5/"]);
    expect(byIp.err).toMatch(/unreachable/i);
    const proxied = await vm.exec({ argv: ["wget", "-q", "-O", "-", `http://web.test:${webPort}/proxy-vars`], timeoutMs: 30_000 });
    expect(proxied.stdout.toString()).toBe(`hello web.test:${webPort}\n`);
    expect(sawPath("/proxy-direct")).toEqual([]);
    expect(vm.netStats()).toMatchObject({ connections: 1, dnsQueries: 0 });
  });
});
