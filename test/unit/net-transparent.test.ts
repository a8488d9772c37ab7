// Transparent connections through the host-side egress (EgressProxy.handleTransparent), over real
// loopback sockets: a raw TCP server on 127.0.0.1 is the outside world and records what reaches
// it; a client socket to a local net.Server stands for the guest program, and each of its
// connections is handed over with the destination and name the agent would report. The VM tests
// (test/vm/egress-transparent.test.ts) run the same path behind a real agent.
import { afterEach, describe, expect, it } from "vitest";
import { connect, createServer, type AddressInfo, type Server, type Socket } from "node:net";
import { connect as tlsConnect } from "node:tls";
import { format } from "node:util";
import { EgressDns } from "../../src/net/dns.js";
import { EgressProxy } from "../../src/net/egress.js";
import type { NetworkOption } from "../../src/schema/network.js";

interface Rig {
  proxy: EgressProxy;
  logs: string[];
  port: number;
  /** What the outside server received, per connection. */
  received: string[];
  /** Where the next guest connection "went": the address and name the agent would report. */
  next: { address: string; port: number; name?: string };
  front: Server;
  outside: Server;
  frontPort: number;
}
const rigs: Rig[] = [];

async function listen(s: Server): Promise<number> {
  await new Promise<void>((resolve) => s.listen(0, "127.0.0.1", resolve));
  return (s.address() as AddressInfo).port;
}

/** The outside world answers `banner` at once (a server-first protocol), then echoes "got N". */
async function rig(network: (port: number) => NetworkOption, opts: { resolve?: (name: string) => Promise<{ address: string }[]>; dnsNow?: () => number } = {}): Promise<Rig & { dns: EgressDns }> {
  const received: string[] = [];
  const outside = createServer((s) => {
    const i = received.push("") - 1;
    s.write("banner\n");
    s.on("data", (c: Buffer) => {
      received[i] += c.toString("latin1");
      if (received[i]!.includes("\r\n\r\n") || received[i]!.includes("ping")) s.end(`got ${received[i]!.length}\n`);
    });
    s.on("error", () => {});
  });
  const port = await listen(outside);
  const logs: string[] = [];
  let dns: EgressDns | undefined;
  // Wired as src/session/egress.ts does: names resolve through the DNS verdicts.
  const proxy = new EgressProxy(network(port), { log: (f, ...a) => logs.push(format(f, ...a)), resolve: (name) => dns!.addressesFor(name) });
  dns = new EgressDns(proxy.policy, { resolve: opts.resolve, now: opts.dnsNow, ttlSeconds: 30 });
  const r = { proxy, logs, port, received, next: { address: "198.18.0.1", port }, outside, dns } as Rig & { dns: EgressDns };
  r.front = createServer((s) => proxy.handleTransparent(s, { address: r.next.address, port: r.next.port }, r.next.name));
  r.frontPort = await listen(r.front);
  rigs.push(r);
  return r;
}

afterEach(async () => {
  for (const r of rigs.splice(0)) {
    await r.proxy.close();
    await new Promise((resolve) => r.front.close(resolve));
    await new Promise((resolve) => r.outside.close(resolve));
  }
});

/** Connects as the guest, sends `data` (unless undefined), and reads until the connection closes. */
function talk(r: Rig, data: string | Buffer | undefined): Promise<{ got: string; error?: string }> {
  return new Promise((resolve) => {
    const s = connect(r.frontPort, "127.0.0.1");
    let got = "";
    let error: string | undefined;
    s.on("data", (c: Buffer) => (got += c.toString("latin1")));
    s.on("error", (e: NodeJS.ErrnoException) => (error = e.code));
    s.on("close", () => resolve({ got, error }));
    if (data !== undefined) s.write(data);
  });
}

const allowWeb = (port: number): NetworkOption => ({ allow: [`web.test:${port}`, `other.test:${port}`, `127.0.0.1:${port}`], hosts: { "web.test": "127.0.0.1", "other.test": "127.0.0.1" } });

describe("transparent egress on the host", () => {
  it("carries a connection to an allowed name's address both ways, server-first bytes included", async () => {
    const r = await rig(allowWeb);
    r.next = { address: "198.18.0.1", port: r.port, name: "web.test" };
    const res = await talk(r, "GET / HTTP/1.1\r\nHost: web.test\r\n\r\n");
    expect(res.got).toBe("banner\ngot 34\n");
    expect(r.received).toEqual(["GET / HTTP/1.1\r\nHost: web.test\r\n\r\n"]);
    // An opaque protocol goes through as it is.
    expect((await talk(r, "ping")).got).toBe("banner\ngot 4\n");
    expect(r.proxy.stats()).toMatchObject({ connections: 2, refused: 0, failed: 0, refusedBy: {} });
  });

  it("refuses a name or address the allowlist does not list, before connecting anywhere, with its reason", async () => {
    const r = await rig(allowWeb);
    r.next = { address: "198.18.0.9", port: r.port, name: "evil.test" };
    expect((await talk(r, "GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")).got).toBe("");
    // An allowed name on a port it is not allowed on.
    r.next = { address: "198.18.0.1", port: 1, name: "web.test" };
    expect((await talk(r, "x")).got).toBe("");
    // An address the program had itself: the metadata service, a private address, and a fake
    // address no name holds.
    for (const address of ["169.254.169.254", "10.1.2.3", "198.18.0.77"]) {
      r.next = { address, port: r.port };
      expect((await talk(r, "x")).got).toBe("");
    }
    expect(r.received).toEqual([]);
    expect(r.proxy.stats()).toMatchObject({ connections: 5, refused: 5, refusedBy: { "not-allowed": 4, "stale-address": 1 } });
    expect(r.logs.join("\n")).toMatch(/evil\.test.*not allowed.*add "evil\.test:\d+" to network\.allow/);
  });

  it("reaches an address listed by IP without a name", async () => {
    const r = await rig(allowWeb);
    r.next = { address: "127.0.0.1", port: r.port };
    expect((await talk(r, "ping")).got).toBe("banner\ngot 4\n");
  });

  it("checks the TLS server name and the HTTP Host sent to an allowed name's address", async () => {
    const r = await rig(allowWeb);
    r.next = { address: "198.18.0.1", port: r.port, name: "web.test" };
    // Another allowed name is fine (the bytes reach the outside: the ClientHello).
    expect(await tlsAttempt(r, "other.test")).toBeGreaterThan(100);
    expect(r.received[0]!.charCodeAt(0)).toBe(0x16);
    // A name off the list is refused before a byte goes out (the outside saw a connection, to
    // the allowed name's address, and nothing on it).
    expect(await tlsAttempt(r, "evil.test")).toBe(0);
    expect((await talk(r, "GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")).got).not.toMatch(/got/);
    // Malformed first bytes that start like TLS are not carried either.
    expect((await talk(r, Buffer.from([0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0, 0, 1, 0]))).got).not.toMatch(/got/);
    expect(r.received.slice(1)).toEqual(["", "", ""]);
    expect(r.proxy.stats()).toMatchObject({ refused: 2, failed: 1, refusedBy: { "name-mismatch": 2 } });
    expect(r.logs.join("\n")).toMatch(/TLS server name \(SNI\).*add "evil\.test:\d+" to network\.allow/);
  });

  it("re-checks an expired DNS answer at connect: a name that now resolves to loopback is refused (rebinding)", async () => {
    let now = 1_000_000;
    let answer = "127.0.0.1";
    const lookups: string[] = [];
    const r = await rig((port) => ({ allow: [`rebind.test:${port}`, `127.0.0.1:${port}`] }), {
      resolve: async (name) => {
        lookups.push(name);
        return [{ address: answer }];
      },
      dnsNow: () => now,
    });
    expect(await r.dns.resolve("rebind.test")).toMatchObject({ verdict: "allow", addresses: ["127.0.0.1"] });
    r.next = { address: "198.18.0.1", port: r.port, name: "rebind.test" };
    expect((await talk(r, "ping")).got).toBe("banner\ngot 4\n");
    expect(lookups).toEqual(["rebind.test"]); // the connect used the guest's answer
    answer = "127.0.0.2";
    now += 31_000;
    expect((await talk(r, "ping")).got).toBe("");
    expect(lookups).toEqual(["rebind.test", "rebind.test"]);
    expect(await r.dns.resolve("rebind.test")).toMatchObject({ verdict: "refused", reason: "private-address" });
    expect(r.proxy.stats()).toMatchObject({ refusedBy: { "private-address": 1 } });
    expect(r.logs.join("\n")).toMatch(/127\.0\.0\.2, a loopback address/);
  });

  it("holds maxConnections and resets the excess at once", async () => {
    const r = await rig((port) => ({ ...(allowWeb(port) as object), maxConnections: 1 }) as NetworkOption);
    r.next = { address: "198.18.0.1", port: r.port, name: "web.test" };
    const first = connect(r.frontPort, "127.0.0.1");
    await new Promise<void>((resolve) => first.once("data", () => resolve()));
    const t0 = Date.now();
    expect((await talk(r, "ping")).got).toBe("");
    expect(Date.now() - t0).toBeLessThan(5_000);
    expect(r.proxy.stats()).toMatchObject({ active: 1, refusedBy: { limit: 1 } });
    first.destroy();
  });
});

/** A TLS handshake attempt naming `servername` through the rig; resolves with the bytes the outside received for it. */
function tlsAttempt(r: Rig, servername: string): Promise<number> {
  const before = r.received.length;
  return new Promise((resolve) => {
    const raw: Socket = connect(r.frontPort, "127.0.0.1");
    const s = tlsConnect({ socket: raw, servername, rejectUnauthorized: false });
    s.on("error", () => {});
    raw.on("close", () => setTimeout(() => resolve(r.received.length > before ? r.received[before]!.length : 0), 50));
  });
}
