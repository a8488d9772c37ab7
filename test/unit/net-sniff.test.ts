// The name a connection's first bytes ask for (src/net/sniff.ts): real ClientHellos from Node's own
// TLS stack (whole, cut short at every length, re-framed over several records, corrupted at
// random), hand-built ones for the cases Node never sends (two names, an IP literal, bad lengths),
// and HTTP/1.x request heads; the verdicts must never be an exception.
import { describe, expect, it } from "vitest";
import { createServer, type AddressInfo, type Socket } from "node:net";
import { connect as tlsConnect } from "node:tls";
import { EGRESS_DEFAULTS } from "../../src/net/flow.js";
import { SNIFF_MAX_BYTES, SNIFF_MAX_HEAD_BYTES, sniff, type Sniffed } from "../../src/net/sniff.js";

/** The first TLS record a Node client sends to a plain TCP server (its ClientHello). */
async function realHello(servername?: string): Promise<Buffer> {
  const sockets: Socket[] = [];
  const server = createServer((s) => sockets.push(s));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;
  try {
    return await new Promise<Buffer>((resolve, reject) => {
      let got = Buffer.alloc(0);
      server.once("connection", (s) => {
        s.on("data", (d: Buffer) => {
          got = Buffer.concat([got, d]);
          if (got.length >= 5 && got.length >= 5 + got.readUInt16BE(3)) resolve(got.subarray(0, 5 + got.readUInt16BE(3)));
        });
      });
      const client = tlsConnect({ host: "127.0.0.1", port, rejectUnauthorized: false, ...(servername === undefined ? {} : { servername }) });
      client.on("error", () => {});
      sockets.push(client);
      setTimeout(() => reject(new Error("no ClientHello within 5 s")), 5000).unref();
    });
  } finally {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}

/** Handshake bytes as TLS records of at most `size` bytes each. */
function frame(handshake: Buffer, size: number): Buffer {
  const records: Buffer[] = [];
  for (let at = 0; at < handshake.length; at += size) {
    const part = handshake.subarray(at, at + size);
    const header = Buffer.from([0x16, 0x03, 0x01, 0, 0]);
    header.writeUInt16BE(part.length, 3);
    records.push(header, part);
  }
  return Buffer.concat(records);
}

const u16 = (n: number) => Buffer.from([n >> 8, n & 255]);
const vec16 = (b: Buffer) => Buffer.concat([u16(b.length), b]);

/** A server_name extension with these (name_type, name) entries. */
function sniExtension(entries: [number, string][]): Buffer {
  const list = Buffer.concat(entries.map(([type, name]) => Buffer.concat([Buffer.from([type]), vec16(Buffer.from(name, "latin1"))])));
  return Buffer.concat([u16(0), vec16(vec16(list))]);
}

/** A minimal ClientHello record (TLS 1.2 shape) with these extensions; `null` for none at all. */
function hello(extensions: Buffer[] | null): Buffer {
  const body = Buffer.concat([
    Buffer.from([0x03, 0x03]),
    Buffer.alloc(32, 7), // random
    Buffer.from([0]), // session id
    vec16(Buffer.from([0x13, 0x01, 0xc0, 0x2f])),
    Buffer.from([1, 0]), // compression: null
    ...(extensions === null ? [] : [vec16(Buffer.concat(extensions))]),
  ]);
  const hs = Buffer.concat([Buffer.from([1, body.length >> 16, (body.length >> 8) & 255, body.length & 255]), body]);
  return frame(hs, 16384);
}

const withSni = (name: string) => hello([Buffer.from([0, 23, 0, 0]), sniExtension([[0, name]])]);
const kinds = new Set(["more", "tls", "http", "other", "bad"]);
const kind = (b: Buffer | string) => sniff(Buffer.isBuffer(b) ? b : Buffer.from(b, "latin1")).kind;
const http = (s: string) => sniff(Buffer.from(s, "latin1"));

/** A seeded PRNG (mulberry32): the fuzz loops are the same on every run. */
function rng(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe("sniff: TLS", () => {
  it("finds the SNI of Node's ClientHello, and none when Node connects to an IP without servername", async () => {
    const named = await realHello("web.example");
    expect(sniff(named)).toEqual({ kind: "tls", sni: "web.example" });
    // Bytes after the hello (the next records) change nothing.
    expect(sniff(Buffer.concat([named, Buffer.from([0x17, 3, 3, 0, 1, 0])]))).toEqual({ kind: "tls", sni: "web.example" });
    const bare = await realHello();
    expect(sniff(bare)).toEqual({ kind: "tls", sni: undefined });
  });

  it("answers more for every prefix of a real ClientHello, and gives the SNI once complete", async () => {
    const h = await realHello("api.web.example");
    for (let n = 0; n < h.length; n++) expect(sniff(h.subarray(0, n)), `prefix ${n}`).toEqual({ kind: "more" });
    expect(sniff(h)).toEqual({ kind: "tls", sni: "api.web.example" });
  });

  it("reassembles a ClientHello fragmented over several records", async () => {
    const h = await realHello("web.example");
    const hs = h.subarray(5);
    for (const size of [Math.ceil(hs.length / 2), 100, 3, 1]) {
      const framed = frame(hs, size);
      expect(framed.length).toBeGreaterThan(h.length);
      expect(sniff(framed), `records of ${size}`).toEqual({ kind: "tls", sni: "web.example" });
      if (size >= 100) for (let n = 0; n < framed.length; n++) expect(sniff(framed.subarray(0, n)).kind, `size ${size} prefix ${n}`).toBe("more");
    }
    // A record of another type before the hello is complete.
    const two = frame(hs, Math.ceil(hs.length / 2));
    const cut = 5 + Math.ceil(hs.length / 2);
    const alert = Buffer.concat([two.subarray(0, cut), Buffer.from([0x15, 3, 3, 0, 2, 2, 40]), two.subarray(cut)]);
    expect(sniff(alert)).toMatchObject({ kind: "bad" });
  });

  it("lowercases the SNI and drops its trailing dot; no extensions or no server_name is sni undefined", () => {
    expect(sniff(withSni("Web.Example."))).toEqual({ kind: "tls", sni: "web.example" });
    expect(sniff(withSni("_svc.a-b.example"))).toEqual({ kind: "tls", sni: "_svc.a-b.example" });
    expect(sniff(hello(null))).toEqual({ kind: "tls", sni: undefined });
    expect(sniff(hello([]))).toEqual({ kind: "tls", sni: undefined });
    expect(sniff(hello([Buffer.from([0, 23, 0, 0])]))).toEqual({ kind: "tls", sni: undefined });
  });

  it("refuses an SNI that is an IP literal or not a DNS name", async () => {
    // Node's own hello with the 11-byte name replaced by an 11-byte IPv4 literal.
    const h = await realHello("web.example");
    const at = h.indexOf("web.example");
    expect(at).toBeGreaterThan(0);
    const ip = Buffer.from(h);
    ip.write("10.20.30.40", at, "latin1");
    expect(sniff(ip)).toMatchObject({ kind: "bad", reason: expect.stringContaining("IP address") });
    for (const name of ["10.0.0.1", "::1", "a..example", "-x.example", "exa mple", "é.example", "a.example\0", ".", "a".repeat(64) + ".example", "x.123"]) {
      expect(sniff(withSni(name)), name).toMatchObject({ kind: "bad" });
    }
  });

  it("refuses two host names, two server_name extensions, other name types and empty lists", () => {
    const two = hello([sniExtension([[0, "web.example"], [0, "evil.example"]])]);
    expect(sniff(two)).toEqual({ kind: "bad", reason: "a server_name with two host names" });
    const twice = hello([sniExtension([[0, "web.example"]]), sniExtension([[0, "evil.example"]])]);
    expect(sniff(twice)).toMatchObject({ kind: "bad", reason: expect.stringContaining("twice") });
    expect(sniff(hello([sniExtension([[1, "web.example"]])]))).toMatchObject({ kind: "bad" });
    expect(sniff(hello([sniExtension([])]))).toMatchObject({ kind: "bad" });
    expect(sniff(hello([Buffer.from([0, 0, 0, 0])]))).toMatchObject({ kind: "bad" }); // server_name with no data
  });

  it("refuses lengths that do not fit their parent", () => {
    const good = withSni("web.example");
    expect(sniff(good)).toEqual({ kind: "tls", sni: "web.example" });
    const patched = (offset: number, bytes: number[]) => {
      const b = Buffer.from(good);
      Buffer.from(bytes).copy(b, offset);
      return sniff(b);
    };
    // Offsets: record 0-4, handshake header 5-8, version 9-10, random 11-42, session id 43,
    // suites 44-49, compression 50-51, extensions length 52-53, extended_master_secret 54-57,
    // server_name: type 58-59, length 60-61, list length 62-63, name type 64, name length 65-66.
    expect(good.readUInt16BE(58)).toBe(0);
    expect(good.toString("latin1", 67)).toBe("web.example");
    expect(patched(3, [0x40, 0x01])).toMatchObject({ kind: "bad", reason: expect.stringContaining("record over") });
    expect(patched(3, [0, 0])).toMatchObject({ kind: "bad" });
    expect(patched(6, [0xff, 0xff, 0xff])).toMatchObject({ kind: "bad", reason: expect.stringContaining("ClientHello over") });
    expect(patched(5, [2])).toMatchObject({ kind: "bad", reason: expect.stringContaining("does not start with a ClientHello") });
    expect(patched(9, [2])).toMatchObject({ kind: "bad" });
    expect(patched(43, [33])).toMatchObject({ kind: "bad" });
    expect(patched(44, [0, 3])).toMatchObject({ kind: "bad" });
    expect(patched(44, [0, 0])).toMatchObject({ kind: "bad" });
    expect(patched(50, [0])).toMatchObject({ kind: "bad" });
    expect(patched(52, [0xff, 0xff])).toMatchObject({ kind: "bad" });
    expect(patched(53, [good[53]! - 1])).toMatchObject({ kind: "bad" });
    for (const [at, what] of [[56, "extension"], [60, "server_name"], [62, "server_name_list"], [65, "host_name"]] as const) {
      for (const delta of [-1, 1, 0xff00]) expect(patched(at, [...u16((good.readUInt16BE(at) + delta) & 0xffff)]), `${what} length ${delta}`).toMatchObject({ kind: "bad" });
    }
    // A byte after the extensions, inside the handshake and the record.
    const trailing = Buffer.concat([good, Buffer.from([0])]);
    trailing.writeUInt16BE(good.length - 5 + 1, 3);
    trailing.writeUInt16BE(good.length - 9 + 1, 7);
    expect(sniff(trailing)).toMatchObject({ kind: "bad", reason: expect.stringContaining("fill it exactly") });
    // The handshake claims more than the record holds: wait for the next record.
    expect(patched(7, [0x01, 0x00])).toEqual({ kind: "more" });
  });

  it("says other for record types that cannot start a TLS connection, and for 0x16 without version 3", () => {
    for (const first of [0x14, 0x15, 0x17]) expect(kind(Buffer.from([first, 3, 3, 0, 2, 1, 0]))).toBe("other");
    expect(kind(Buffer.from([0x16, 0x02, 0x00]))).toBe("other");
    expect(kind(Buffer.from([0x80, 0x2e, 0x01]))).toBe("other"); // an SSLv2 hello
    expect(kind(Buffer.from([0x16]))).toBe("more");
    expect(kind(Buffer.from([0x16, 0x03]))).toBe("more");
  });

  it("never throws on a real ClientHello flipped, cut and extended at random", async () => {
    const h = await realHello("web.example");
    const random = rng(42);
    const seen = new Set<string>();
    for (let i = 0; i < 2000; i++) {
      const b = Buffer.from(h);
      const flips = 1 + Math.floor(random() * 4);
      for (let f = 0; f < flips; f++) b[Math.floor(random() * b.length)] = Math.floor(random() * 256);
      const input = i % 3 === 0 ? b.subarray(0, Math.floor(random() * b.length)) : i % 3 === 1 ? Buffer.concat([b, Buffer.alloc(Math.floor(random() * 64), 0x16)]) : b;
      let v: Sniffed | undefined;
      expect(() => (v = sniff(input))).not.toThrow();
      expect(kinds.has(v!.kind), JSON.stringify(v)).toBe(true);
      if (v!.kind === "tls" && v!.sni !== undefined) expect(v!.sni).toMatch(/^[a-z0-9_.-]{1,253}$/);
      if (v!.kind === "bad") expect(v!.reason.length).toBeGreaterThan(0);
      seen.add(v!.kind);
    }
    // The corruption reaches the parser: some flips are caught, some (in the random) change nothing.
    expect(seen.has("bad")).toBe(true);
    expect(seen.has("tls")).toBe(true);
    expect(seen.has("more")).toBe(true);
  });

  it("answers bad, never more, once it holds SNIFF_MAX_BYTES", () => {
    expect(SNIFF_MAX_BYTES).toBe(16 * 1024 + 5);
    // Records of one byte each: the hello never completes within the bound.
    const big = hello([Buffer.concat([u16(0xff00), vec16(Buffer.alloc(3000, 1))])]);
    expect(sniff(big)).toEqual({ kind: "tls", sni: undefined });
    const tiny = frame(big.subarray(5), 1);
    expect(tiny.length).toBeGreaterThan(SNIFF_MAX_BYTES);
    expect(sniff(tiny.subarray(0, SNIFF_MAX_BYTES - 1))).toEqual({ kind: "more" });
    expect(sniff(tiny.subarray(0, SNIFF_MAX_BYTES))).toMatchObject({ kind: "bad", reason: expect.stringContaining(`${SNIFF_MAX_BYTES} bytes`) });
    expect(sniff(tiny)).toMatchObject({ kind: "bad" });
  });
});

describe("sniff: HTTP", () => {
  it("finds the Host header's host: lowercase, without port or brackets", () => {
    expect(http("GET / HTTP/1.1\r\nHost: Web.Example:8080\r\n\r\n")).toEqual({ kind: "http", method: "GET", host: "web.example" });
    expect(http("POST /x HTTP/1.1\r\nContent-Length: 0\r\nhost: web.example.\r\n\r\nbody")).toEqual({ kind: "http", method: "POST", host: "web.example" });
    expect(http("GET / HTTP/1.1\r\nHost: [2001:DB8::1]:443\r\n\r\n")).toEqual({ kind: "http", method: "GET", host: "2001:db8::1" });
    expect(http("GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n")).toEqual({ kind: "http", method: "GET", host: "::1" });
    expect(http("GET / HTTP/1.1\r\nHost: 93.184.216.34\r\n\r\n")).toEqual({ kind: "http", method: "GET", host: "93.184.216.34" });
    expect(http("GET / HTTP/1.0\r\n\r\n")).toEqual({ kind: "http", method: "GET", host: undefined });
    expect(http("\r\nGET / HTTP/1.1\r\nHost: web.example\r\n\r\n")).toEqual({ kind: "http", method: "GET", host: "web.example" });
    expect(http("ABCDEFGHIJKLMNOPQRST / HTTP/1.1\r\nHost: a.example\r\n\r\n")).toMatchObject({ kind: "http", host: "a.example" });
  });

  it("answers more for every prefix of a request head", () => {
    const req = "\r\nOPTIONS * HTTP/1.1\r\nHost: web.example\r\nAccept: */*\r\n\r\n";
    for (let n = 0; n < req.length; n++) expect(http(req.slice(0, n)), `prefix ${JSON.stringify(req.slice(0, n))}`).toEqual({ kind: "more" });
    expect(http(req)).toEqual({ kind: "http", method: "OPTIONS", host: "web.example" });
  });

  it("says other for what is neither TLS nor HTTP, as soon as a byte rules both out", () => {
    expect(kind("SSH-2.0-OpenSSH\r\n")).toBe("other");
    expect(kind("SSH")).toBe("more");
    expect(kind("SSH-")).toBe("other");
    expect(kind(Buffer.from([0]))).toBe("other");
    expect(kind(Buffer.from([0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f]))).toBe("other"); // a PostgreSQL SSLRequest
    expect(kind("get / HTTP/1.1\r\n\r\n")).toBe("other");
    expect(kind("ABCDEFGHIJKLMNOPQRSTU / HTTP/1.1\r\n\r\n")).toBe("other");
    expect(kind("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")).toBe("other");
  });

  it("refuses two Host headers, a Host the target contradicts, and invalid hosts", () => {
    expect(http("GET / HTTP/1.1\r\nHost: web.example\r\nHOST: evil.example\r\n\r\n")).toEqual({ kind: "bad", reason: "an HTTP request with two Host headers" });
    expect(http("GET / HTTP/1.1\r\nHost: web.example\r\nHost: web.example\r\n\r\n")).toMatchObject({ kind: "bad" });
    expect(http("GET http://evil.example/ HTTP/1.1\r\nHost: web.example\r\n\r\n")).toMatchObject({ kind: "bad", reason: expect.stringContaining("different hosts") });
    expect(http("GET http://u@Web.Example:80/x HTTP/1.1\r\nHost: web.example\r\n\r\n")).toEqual({ kind: "http", method: "GET", host: "web.example" });
    expect(http("GET http://web.example/ HTTP/1.0\r\n\r\n")).toEqual({ kind: "http", method: "GET", host: "web.example" });
    expect(http("CONNECT evil.example:443 HTTP/1.1\r\nHost: web.example\r\n\r\n")).toMatchObject({ kind: "bad" });
    expect(http("CONNECT web.example:443 HTTP/1.1\r\n\r\n")).toEqual({ kind: "http", method: "CONNECT", host: "web.example" });
    for (const h of ["", "exa mple", "web.example:99999", "web.example:x", "::1", "[web.example]", "[::1", "a..b"]) {
      expect(http(`GET / HTTP/1.1\r\nHost: ${h}\r\n\r\n`), h).toMatchObject({ kind: "bad" });
    }
  });

  it("refuses malformed heads early", () => {
    expect(http("GET / HTTP/2.0\r\n")).toMatchObject({ kind: "bad" });
    expect(http("GET /\r\n")).toMatchObject({ kind: "bad" });
    expect(http("GET  / HTTP/1.1\r\n")).toMatchObject({ kind: "bad" });
    expect(http("GET / HTTP/1.1\nHost: web.example\n\n")).toEqual({ kind: "bad", reason: "a line not ended by CRLF" });
    expect(http("GET / HTTP/1.1\r\nHost: web.example\n")).toMatchObject({ kind: "bad" });
    expect(http("GET / HTTP/1.1\r\nBad Header: x\r\n\r\n")).toMatchObject({ kind: "bad" });
    expect(http("GET / HTTP/1.1\r\n folded\r\n\r\n")).toMatchObject({ kind: "bad" });
  });

  it("bounds the head at 16 KiB like the proxy", () => {
    expect(SNIFF_MAX_HEAD_BYTES).toBe(EGRESS_DEFAULTS.maxHeadBytes);
    const filler = `X-Filler: ${"a".repeat(20 * 1024)}\r\n`;
    expect(http(`GET / HTTP/1.1\r\nHost: web.example\r\n${filler}\r\n`)).toMatchObject({ kind: "bad", reason: expect.stringContaining("over 16384 bytes") });
    expect(http(`GET / HTTP/1.1\r\nHost: web.example\r\n${filler}`)).toMatchObject({ kind: "bad" });
    // Just under the bound, complete: accepted.
    const head = `GET / HTTP/1.1\r\nHost: web.example\r\nX: `;
    const fits = `${head}${"a".repeat(SNIFF_MAX_HEAD_BYTES - head.length - 4)}\r\n\r\n`;
    expect(fits.length).toBe(SNIFF_MAX_HEAD_BYTES);
    expect(http(fits)).toMatchObject({ kind: "http", host: "web.example" });
    expect(http(fits.replace("X: a", "X: aa"))).toMatchObject({ kind: "bad" });
    // An incomplete head just over the bound.
    expect(http(fits.slice(0, -4) + "a".repeat(5))).toMatchObject({ kind: "bad" });
  });

  it("never throws on request heads flipped and cut at random", () => {
    const req = Buffer.from("GET /index.html HTTP/1.1\r\nHost: Web.Example:8080\r\nAccept: */*\r\n\r\n", "latin1");
    const random = rng(7);
    for (let i = 0; i < 2000; i++) {
      const b = Buffer.from(req);
      b[Math.floor(random() * b.length)] = Math.floor(random() * 256);
      const input = i % 2 === 0 ? b.subarray(0, Math.floor(random() * (b.length + 1))) : b;
      const v = sniff(input);
      expect(kinds.has(v.kind)).toBe(true);
      if (v.kind === "http" && v.host !== undefined) expect(v.host).toBe(v.host.toLowerCase());
    }
  });
});
