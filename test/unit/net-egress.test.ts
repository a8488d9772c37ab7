// The host-side egress proxy (src/net/egress.ts) over real loopback sockets: an http server on
// 127.0.0.1 is the outside world, a plain client socket to a local net.Server whose connections go
// to proxy.handle is the guest.
import { afterEach, describe, expect, it } from "vitest";
import { createServer, type Server as HttpServer } from "node:http";
import { connect, createServer as createNetServer, type AddressInfo, type Server, type Socket } from "node:net";
import { format } from "node:util";
import { EgressProxy, type EgressDeps } from "../../src/net/egress.js";
import type { NetworkOption } from "../../src/schema/network.js";

interface Rig {
  proxy: EgressProxy;
  logs: string[];
  upstreamPort: number;
  proxyPort: number;
  upstream: HttpServer;
  front: Server;
  served: string[];
}
const rigs: Rig[] = [];

async function listen(s: Server | HttpServer): Promise<number> {
  await new Promise<void>((resolve) => s.listen(0, "127.0.0.1", resolve));
  return (s.address() as AddressInfo).port;
}

/** `network(port)` gets the upstream's port. */
async function rig(network: (port: number) => NetworkOption, deps: EgressDeps = {}, body = (url: string) => `hello ${url}`): Promise<Rig> {
  const served: string[] = [];
  const upstream = createServer((req, res) => {
    served.push(`${req.method} ${req.url} host=${req.headers.host} connection=${req.headers.connection} proxy-auth=${req.headers["proxy-authorization"]}`);
    res.setHeader("Keep-Alive", "timeout=5");
    res.end(body(req.url ?? ""));
  });
  const upstreamPort = await listen(upstream);
  const logs: string[] = [];
  const proxy = new EgressProxy(network(upstreamPort), { log: (f, ...a) => logs.push(format(f, ...a)), ...deps });
  const front = createNetServer((s) => proxy.handle(s));
  const proxyPort = await listen(front);
  const r = { proxy, logs, upstreamPort, proxyPort, upstream, front, served };
  rigs.push(r);
  return r;
}

afterEach(async () => {
  for (const r of rigs.splice(0)) {
    await r.proxy.close();
    r.upstream.closeAllConnections();
    await new Promise((resolve) => r.upstream.close(resolve));
    await new Promise((resolve) => r.front.close(resolve));
  }
});

/** Sends `raw` through the proxy and reads until the proxy closes. */
function roundTrip(r: Rig, raw: string | Buffer, { end = false } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(r.proxyPort, "127.0.0.1");
    const chunks: Buffer[] = [];
    s.on("data", (c) => chunks.push(c));
    s.on("error", reject);
    s.on("close", () => resolve(Buffer.concat(chunks).toString("latin1")));
    s.write(raw);
    if (end) s.end();
  });
}

/** Opens a CONNECT tunnel; resolves with the socket once the 200 arrived, and what followed it. */
function tunnel(r: Rig, target: string): Promise<{ socket: Socket; head: string }> {
  return new Promise((resolve, reject) => {
    const s = connect(r.proxyPort, "127.0.0.1");
    let buf = "";
    const onData = (c: Buffer) => {
      buf += c.toString("latin1");
      const end = buf.indexOf("\r\n\r\n");
      if (end < 0) return;
      s.off("data", onData);
      resolve({ socket: s, head: buf.slice(0, end + 4) });
    };
    s.on("data", onData);
    s.on("error", reject);
    s.on("close", () => reject(new Error(`closed: ${buf}`)));
    s.write(`CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\n\r\n`);
  });
}

function readAll(s: Socket): Promise<string> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    s.removeAllListeners("close");
    s.on("data", (c) => chunks.push(c));
    s.on("close", () => resolve(Buffer.concat(chunks).toString("latin1")));
  });
}

/** Waits (at most 1 s) until the proxy has let go of every connection. */
async function idle(r: Rig): Promise<void> {
  for (let i = 0; i < 100 && r.proxy.stats().active > 0; i++) await new Promise((res) => setTimeout(res, 10));
}

const get = (url: string, extra = "") => `GET ${url} HTTP/1.1\r\nHost: ignored.example\r\nProxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\n${extra}\r\n`;

describe("EgressProxy", () => {
  it("tunnels CONNECT and forwards plain HTTP to a hosts name when the loopback IP is listed", async () => {
    const r = await rig((p) => ({ allow: [`pypi.local:${p}`, `127.0.0.1:${p}`], hosts: { "pypi.local": "127.0.0.1" } }));
    const t = await tunnel(r, `pypi.local:${r.upstreamPort}`);
    expect(t.head).toBe("HTTP/1.1 200 Connection established\r\n\r\n");
    const rest = readAll(t.socket);
    t.socket.write("GET /via-tunnel HTTP/1.1\r\nHost: pypi.local\r\nConnection: close\r\n\r\n");
    expect(await rest).toMatch(/^HTTP\/1\.1 200 OK[\s\S]*hello \/via-tunnel$/);

    const plain = await roundTrip(r, get(`http://PyPI.local:${r.upstreamPort}/simple/?q=1#frag`));
    expect(plain).toMatch(/^HTTP\/1\.1 200 OK\r\n/);
    expect(plain).toContain("\r\nConnection: close\r\n");
    expect(plain).not.toMatch(/keep-alive/i);
    expect(plain.endsWith("hello /simple/?q=1")).toBe(true);
    expect(r.served[1]).toBe(`GET /simple/?q=1 host=pypi.local:${r.upstreamPort} connection=close proxy-auth=undefined`);
    const st = r.proxy.stats();
    expect(st).toMatchObject({ connections: 2, refused: 0, failed: 0 });
    expect(st.bytesOut).toBeGreaterThan(100);
    expect(st.bytesIn).toBeGreaterThan(100);
  });

  it("reaches localhost through the real resolver when 127.0.0.1 is listed", async () => {
    const r = await rig((p) => ({ allow: [`localhost:${p}`, `127.0.0.1:${p}`] }));
    const out = await roundTrip(r, get(`http://localhost:${r.upstreamPort}/x`));
    expect(out).toMatch(/^HTTP\/1\.1 200 OK[\s\S]*hello \/x$/);
  });

  it("refuses a name that resolves to loopback when only the name is listed (403, the address named)", async () => {
    const r = await rig((p) => ({ allow: [`pypi.local:${p}`, `localhost:${p}`], hosts: { "pypi.local": "127.0.0.1" } }));
    const viaHosts = await roundTrip(r, `CONNECT pypi.local:${r.upstreamPort} HTTP/1.1\r\n\r\n`);
    expect(viaHosts).toMatch(/^HTTP\/1\.1 403 Forbidden\r\n/);
    expect(viaHosts).toContain("Proxy-Status: supermachine; error=destination_ip_prohibited");
    expect(viaHosts).toContain(`egress to pypi.local:${r.upstreamPort} is not allowed: it resolves to 127.0.0.1, a loopback address`);
    expect(viaHosts).toContain(`add "127.0.0.1:${r.upstreamPort}" to network.allow`);
    const viaDns = await roundTrip(r, get(`http://localhost:${r.upstreamPort}/`));
    expect(viaDns).toMatch(/^HTTP\/1\.1 403 Forbidden\r\n[\s\S]*a loopback address/);
    expect(r.served).toEqual([]);
    expect(r.proxy.stats().refused).toBe(2);
    expect(r.logs.filter((l) => l.startsWith("refused 403 (private-address)"))).toHaveLength(2);
  });

  it("refuses an unlisted host with 403 and a body naming it and the option, before any DNS", async () => {
    const lookups: string[] = [];
    const r = await rig(() => ({ allow: ["*.example.org", "api.example:8443"] }), {
      resolve: async (n) => {
        lookups.push(n);
        return [{ address: "127.0.0.1", family: 4 }];
      },
    });
    const out = await roundTrip(r, "CONNECT evil.example:443 HTTP/1.1\r\n\r\n");
    expect(out).toMatch(/^HTTP\/1\.1 403 Forbidden\r\n/);
    expect(out.split("\r\n\r\n")[1]).toBe('supermachine: egress to evil.example:443 is not allowed (network.allow does not list it); add "evil.example" to network.allow\n');
    // Wildcards: subdomains only; ports: as listed.
    expect(await roundTrip(r, "CONNECT example.org:443 HTTP/1.1\r\n\r\n")).toMatch(/^HTTP\/1\.1 403 [\s\S]*add "example\.org"/);
    expect(await roundTrip(r, "CONNECT api.example:443 HTTP/1.1\r\n\r\n")).toMatch(/^HTTP\/1\.1 403 /);
    expect(await roundTrip(r, "CONNECT x.example.org:8080 HTTP/1.1\r\n\r\n")).toMatch(/add "x\.example\.org:8080"/);
    expect(lookups).toEqual([]);
    // Allowed by the list, then the resolved loopback address is refused.
    expect(await roundTrip(r, "CONNECT a.b.example.org:443 HTTP/1.1\r\n\r\n")).toMatch(/^HTTP\/1\.1 403 [\s\S]*resolves to 127\.0\.0\.1/);
    expect(await roundTrip(r, "CONNECT api.example:8443 HTTP/1.1\r\n\r\n")).toMatch(/^HTTP\/1\.1 403 [\s\S]*resolves to 127\.0\.0\.1/);
    expect(lookups).toEqual(["a.b.example.org", "api.example"]);
    expect(r.logs.some((l) => l.includes("egress to evil.example:443 is not allowed"))).toBe(true);
  });

  it("answers 429 while maxConnections tunnels are open, and serves again once one closes", async () => {
    const r = await rig((p) => ({ allow: [`127.0.0.1:${p}`], maxConnections: 2 }));
    const a = await tunnel(r, `127.0.0.1:${r.upstreamPort}`);
    const b = await tunnel(r, `127.0.0.1:${r.upstreamPort}`);
    expect(r.proxy.stats().active).toBe(2);
    const third = await roundTrip(r, `CONNECT 127.0.0.1:${r.upstreamPort} HTTP/1.1\r\n\r\n`);
    expect(third).toMatch(/^HTTP\/1\.1 429 Too Many Requests\r\n[\s\S]*network\.maxConnections is 2/);
    const closedA = readAll(a.socket);
    a.socket.end();
    await closedA;
    for (let i = 0; i < 100 && r.proxy.stats().active > 1; i++) await new Promise((res) => setTimeout(res, 10));
    const c = await tunnel(r, `127.0.0.1:${r.upstreamPort}`);
    expect(c.head).toMatch(/^HTTP\/1\.1 200 /);
    b.socket.destroy();
    c.socket.destroy();
    expect(r.proxy.stats()).toMatchObject({ connections: 4, refused: 1 });
  });

  it("ends transfers at maxBytes and refuses new connections with 403 naming network.maxBytes", async () => {
    const r = await rig((p) => ({ allow: [`127.0.0.1:${p}`], maxBytes: 4000 }), {}, () => "x".repeat(20_000));
    const first = await roundTrip(r, get(`http://127.0.0.1:${r.upstreamPort}/big`));
    expect(first).toMatch(/^HTTP\/1\.1 200 OK/);
    expect(first.length).toBeLessThan(4000);
    const st = r.proxy.stats();
    expect(st.bytesIn + st.bytesOut).toBeLessThanOrEqual(4000);
    const second = await roundTrip(r, get(`http://127.0.0.1:${r.upstreamPort}/again`));
    expect(second).toMatch(/^HTTP\/1\.1 403 Forbidden\r\n[\s\S]*network\.maxBytes \(4000 bytes/);
    expect(r.served).toEqual(["GET /big host=127.0.0.1:" + r.upstreamPort + " connection=close proxy-auth=undefined"]);
  });

  it.each([
    ["origin-form", "GET /path HTTP/1.1\r\nHost: x\r\n\r\n", /origin-form request/],
    ["https absolute-form", "GET https://x.example/ HTTP/1.1\r\n\r\n", /use CONNECT for https/],
    ["HTTP/2", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", /HTTP\/2\.0/],
    ["garbage", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", /request line/],
    ["a bare LF", "GET http://x/ HTTP/1.1\nHost: x\r\n\r\n", /CRLF/],
    ["CONNECT without a port", "CONNECT x.example HTTP/1.1\r\n\r\n", /host:port/],
    ["an unbracketed IPv6 URL", "GET http://::1/ HTTP/1.1\r\n\r\n", /brackets/],
  ])("answers 400 to %s, saying what it accepts", async (_, raw, why) => {
    const r = await rig(() => ({ allow: ["x.example"] }));
    const out = await roundTrip(r, raw);
    expect(out).toMatch(/^HTTP\/1\.1 400 Bad Request\r\n/);
    expect(out).toMatch(why);
    expect(out).toContain("accepts `CONNECT host:port HTTP/1.1`");
    await idle(r);
    expect(r.proxy.stats()).toMatchObject({ failed: 1, active: 0 });
  });

  it("answers 431 to a head over 16 KiB and 408 when the head does not come in time", async () => {
    const r = await rig(() => ({ allow: ["x.example"] }), { headTimeoutMs: 150 });
    const big = await roundTrip(r, `GET http://x.example/ HTTP/1.1\r\nX-Fill: ${"a".repeat(17_000)}\r\n\r\n`);
    expect(big).toMatch(/^HTTP\/1\.1 431 Request Header Fields Too Large\r\n/);
    const t0 = Date.now();
    const slow = await roundTrip(r, "GET http://x.example/ HTTP/1.1\r\n");
    expect(slow).toMatch(/^HTTP\/1\.1 408 Request Timeout\r\n[\s\S]*within 150 ms/);
    expect(Date.now() - t0).toBeLessThan(1000);
  });

  it("answers 502 when the upstream refuses the connection", async () => {
    const closedServer = createNetServer();
    const port = await listen(closedServer);
    await new Promise((res) => closedServer.close(res));
    const r = await rig(() => ({ allow: [`127.0.0.1:${port}`] }));
    const out = await roundTrip(r, `CONNECT 127.0.0.1:${port} HTTP/1.1\r\n\r\n`);
    expect(out).toMatch(/^HTTP\/1\.1 502 Bad Gateway\r\n[\s\S]*cannot connect to 127\.0\.0\.1:\d+ \(127\.0\.0\.1:\d+: ECONNREFUSED\)/);
    expect(out).toContain("error=connection_refused");
  });

  it("leaves no socket or timer after close()", async () => {
    const r = await rig((p) => ({ allow: [`127.0.0.1:${p}`, "x.example"] }));
    const before = process.getActiveResourcesInfo().filter((x) => x === "TCPSocketWrap" || x === "Timeout").length;
    const a = await tunnel(r, `127.0.0.1:${r.upstreamPort}`);
    const half = connect(r.proxyPort, "127.0.0.1");
    half.write("GET http://x.example/ HTTP/1.1\r\n");
    await new Promise((res) => setTimeout(res, 50));
    expect(r.proxy.stats().active).toBe(2);
    const ends = [readAll(a.socket), new Promise((res) => half.on("close", res))];
    await r.proxy.close();
    await r.proxy.close();
    await Promise.all(ends);
    expect(r.proxy.stats().active).toBe(0);
    r.upstream.closeAllConnections();
    await new Promise((res) => setTimeout(res, 20));
    const after = process.getActiveResourcesInfo().filter((x) => x === "TCPSocketWrap" || x === "Timeout").length;
    expect(after).toBeLessThanOrEqual(before);
    // A closed proxy takes nothing more.
    const late = await roundTrip(r, "CONNECT x.example:443 HTTP/1.1\r\n\r\n");
    expect(late).toBe("");
  });
});
