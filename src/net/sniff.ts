/**
 * The name a connection really asks for, read from its first bytes (transparent egress). A guest
 * program connects to the address our DNS gave it for an allowed name; before its bytes go out,
 * the host looks at them to find the name the client names to the server: the TLS ClientHello's
 * SNI (server_name, host_name), or the HTTP/1.x request's Host header. The caller checks that name
 * against the allowlist, so a connection to an allowed name's address cannot ask a shared server
 * (a CDN, a virtual host) for another one.
 *
 * Everything here comes from the guest and is untrusted. `sniff` is pure: it never throws, reads
 * only inside the buffer it is given, checks each nested length against its parent before using
 * it, and looks at no more than SNIFF_MAX_BYTES; the only copies it makes are of the handshake
 * bytes of a fragmented ClientHello, which are fewer than those bytes. The caller calls it again
 * with the longer buffer each time bytes arrive, until the verdict is not "more".
 *
 * Decisions, made as early as the bytes allow:
 * - TLS starts with 0x16 (a handshake record), then version major 0x03. The handshake bytes of
 *   consecutive handshake records are joined until the ClientHello is complete; its lengths are
 *   strict (each fits its parent exactly). A server_name that is not a valid DNS name, holds an IP
 *   literal (RFC 6066 forbids it), or appears twice is "bad". Another handshake message first, or a
 *   record of another type before the hello is complete, is "bad". Other record types as the first
 *   byte (0x14 change_cipher_spec, 0x15 alert, 0x17 application_data) cannot start a connection's
 *   TLS, and 0x16 followed by anything but 0x03 is not TLS either: both are "other", like SSLv2's
 *   0x80 hello, which no current server accepts.
 * - HTTP starts with a method of 1 to 20 letters A-Z and a space. The head (up to CRLF CRLF) is
 *   bounded like the proxy's (SNIFF_MAX_HEAD_BYTES, flow.ts's maxHeadBytes) and parsed by
 *   parseRequestHead. Versions 1.0 and 1.1 only; "PRI * HTTP/2.0" (h2c with prior knowledge) is
 *   "other": it carries the name in HTTP/2 frames, not here. Leading empty lines are skipped, as
 *   servers do (RFC 9112 2.2), so they cannot hide a request behind an "other" verdict. Host must
 *   appear at most once; an absolute-form target (or CONNECT's authority) must name the same host.
 * - Anything else is "other" once a byte rules out both (a first byte that is neither 0x16 nor
 *   A-Z, a non-letter before the first space, a 21st letter).
 */
import { Buffer } from "node:buffer";
import { parseHost, parsePort, splitHostPort } from "../schema/network.js";
import { headEnd, parseRequestHead } from "./http-head.js";

/**
 * The most bytes `sniff` ever needs: one full TLS record (a 5-byte header and 2^14 bytes), which
 * also holds the longest HTTP head (16 KiB, as the proxy allows). A caller holding this many bytes
 * without a verdict refuses the connection; `sniff` itself answers "bad" rather than "more" then.
 */
export const SNIFF_MAX_BYTES = 5 + 16 * 1024;

/** The verdict on a connection's first bytes; see the file comment. */
export type Sniffed =
  /** A TLS or HTTP start, incomplete: call again with more bytes. */
  | { kind: "more" }
  /** A complete ClientHello; `sni` lowercase without a trailing dot, undefined when absent. */
  | { kind: "tls"; sni: string | undefined }
  /** A complete request head; `host` lowercase, without port or IPv6 brackets, undefined when absent. */
  | { kind: "http"; method: string; host: string | undefined }
  /** Neither TLS nor HTTP (SSH, a database protocol...): opaque. */
  | { kind: "other" }
  /** Starts like TLS or HTTP but is malformed, over the bound, or names two hosts. */
  | { kind: "bad"; reason: string };

const MORE: Sniffed = { kind: "more" };
const OTHER: Sniffed = { kind: "other" };
const bad = (reason: string): Sniffed => ({ kind: "bad", reason });

/** The largest TLSPlaintext fragment (RFC 8446 5.1). */
const MAX_RECORD = 16 * 1024;
const MAX_METHOD = 20;
/** The longest request head, as the proxy allows (EGRESS_DEFAULTS.maxHeadBytes in flow.ts, kept equal by a test; not imported: flow.ts does I/O). */
export const SNIFF_MAX_HEAD_BYTES = 16 * 1024;

/** What the client asks for in `buf`, the first bytes of a connection (see Sniffed). Never throws. */
export function sniff(buf: Buffer): Sniffed {
  const seen = buf.length > SNIFF_MAX_BYTES ? buf.subarray(0, SNIFF_MAX_BYTES) : buf;
  let verdict: Sniffed;
  try {
    verdict = classify(seen);
  } catch {
    // Not expected (every read is checked); a verdict all the same, never an exception.
    verdict = bad("an unreadable start");
  }
  if (verdict.kind === "more" && buf.length >= SNIFF_MAX_BYTES) return bad(`no verdict within ${SNIFF_MAX_BYTES} bytes`);
  return verdict;
}

function classify(buf: Buffer): Sniffed {
  // Leading empty lines: servers skip them before a request line (RFC 9112 2.2).
  let start = 0;
  while (start < buf.length && (buf[start] === 0x0d || buf[start] === 0x0a)) start++;
  if (start === buf.length) return MORE;
  const first = buf[start]!;
  if (start === 0 && first === 0x16) return sniffTls(buf);
  if (first >= 0x41 && first <= 0x5a) return sniffHttp(buf.subarray(start));
  return OTHER;
}

// ---- TLS --------------------------------------------------------------------------------------

/** Reassembles the first handshake message from consecutive handshake records, then parses it. */
function sniffTls(buf: Buffer): Sniffed {
  if (buf.length < 2) return MORE;
  if (buf[1] !== 0x03) return OTHER;
  const fragments: Buffer[] = [];
  let have = 0;
  let need = -1; // the handshake message's full length (header included), once known
  let at = 0;
  for (;;) {
    if (buf.length < at + 5) return MORE;
    if (buf[at] !== 0x16) return bad("a TLS record that is not a handshake inside the ClientHello");
    if (buf[at + 1] !== 0x03) return bad("a TLS record with a version that is not 3.x");
    const len = buf.readUInt16BE(at + 3);
    if (len === 0) return bad("an empty TLS handshake record");
    if (len > MAX_RECORD) return bad(`a TLS record over ${MAX_RECORD} bytes`);
    const body = buf.subarray(at + 5, Math.min(buf.length, at + 5 + len));
    if (have === 0 && body.length > 0 && body[0] !== 0x01) return bad("a TLS handshake that does not start with a ClientHello");
    fragments.push(body);
    have += body.length;
    if (need < 0 && have >= 4) {
      const head = fragments.length === 1 ? body : Buffer.concat(fragments, 4);
      need = 4 + head.readUIntBE(1, 3);
      if (need + 5 > SNIFF_MAX_BYTES) return bad(`a ClientHello over ${SNIFF_MAX_BYTES - 5} bytes`);
    }
    if (need >= 0 && have >= need) break;
    if (body.length < len) return MORE;
    at += 5 + len;
  }
  const hello = fragments.length === 1 ? fragments[0]! : Buffer.concat(fragments, have);
  return parseClientHello(hello.subarray(4, need));
}

/** A bounds-checked cursor over one byte range. Every read says whether it fit. */
class Reader {
  constructor(
    private readonly buf: Buffer,
    public pos = 0,
    private readonly end = buf.length,
  ) {}

  get left(): number {
    return this.end - this.pos;
  }

  u8(): number | undefined {
    if (this.left < 1) return undefined;
    return this.buf[this.pos++];
  }

  u16(): number | undefined {
    if (this.left < 2) return undefined;
    const v = this.buf.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }

  /** The next `n` bytes as a Reader of their own, or undefined when fewer are left. */
  take(n: number): Reader | undefined {
    if (n > this.left) return undefined;
    const r = new Reader(this.buf, this.pos, this.pos + n);
    this.pos += n;
    return r;
  }

  /** A vector with a 1- or 2-byte length, as a Reader of its own. */
  vector(lenBytes: 1 | 2): Reader | undefined {
    const n = lenBytes === 1 ? this.u8() : this.u16();
    return n === undefined ? undefined : this.take(n);
  }

  text(): string {
    return this.buf.toString("latin1", this.pos, this.end);
  }
}

/** The ClientHello body (after the 4-byte handshake header): its SNI, or why it is malformed. */
function parseClientHello(body: Buffer): Sniffed {
  const r = new Reader(body);
  const version = r.take(2);
  if (!version || version.u8() !== 0x03) return bad("a ClientHello with a version that is not 3.x");
  if (!r.take(32)) return bad("a ClientHello cut short in its random");
  const session = r.vector(1);
  if (!session || session.left > 32) return bad("a ClientHello with an invalid session id");
  const suites = r.vector(2);
  if (!suites || suites.left === 0 || suites.left % 2 !== 0) return bad("a ClientHello with invalid cipher suites");
  const compression = r.vector(1);
  if (!compression || compression.left === 0) return bad("a ClientHello with invalid compression methods");
  if (r.left === 0) return { kind: "tls", sni: undefined }; // no extensions at all (TLS 1.2 allows it)
  const extensions = r.vector(2);
  if (!extensions || r.left !== 0) return bad("a ClientHello whose extensions do not fill it exactly");
  const types = new Set<number>();
  let sni: string | undefined;
  while (extensions.left > 0) {
    const type = extensions.u16();
    const data = extensions.vector(2);
    if (type === undefined || !data) return bad("a ClientHello extension that overruns its list");
    if (types.has(type)) return bad(`a ClientHello with extension ${type} twice`);
    types.add(type);
    if (type !== 0) continue;
    const name = parseServerName(data);
    if (typeof name !== "object") return bad(name);
    sni = name.host;
  }
  return { kind: "tls", sni };
}

/** The server_name extension's data (RFC 6066 3): its one host_name, or why not. */
function parseServerName(data: Reader): { host: string } | string {
  const list = data.vector(2);
  if (!list || data.left !== 0 || list.left === 0) return "a server_name extension with an invalid list";
  let host: string | undefined;
  while (list.left > 0) {
    const type = list.u8();
    if (type !== 0) return "a server_name entry that is not a host_name";
    const name = list.vector(2);
    if (!name || name.left === 0) return "a server_name host_name that overruns its list";
    if (host !== undefined) return "a server_name with two host names";
    const raw = name.text();
    const parsed = parseHost(raw);
    if ("error" in parsed) return `a server_name that ${parsed.error}`;
    if (parsed.kind === "ip") return "a server_name that is an IP address (RFC 6066 allows names only)";
    host = parsed.host;
  }
  return { host: host! };
}

// ---- HTTP -------------------------------------------------------------------------------------

/** A request head at the start of `buf` (after any empty lines). */
function sniffHttp(buf: Buffer): Sniffed {
  // The method: 1 to 20 letters A-Z, then a space; otherwise not HTTP.
  let i = 0;
  while (i < buf.length && i <= MAX_METHOD) {
    const c = buf[i]!;
    if (c === 0x20) break;
    if (c < 0x41 || c > 0x5a) return OTHER;
    i++;
  }
  if (i > MAX_METHOD) return OTHER;
  if (i === buf.length) return MORE;
  // Lines end with CRLF: a bare LF is an error now, not a wait for a CRLF CRLF that never comes.
  for (let lf = buf.indexOf(0x0a); lf >= 0; lf = buf.indexOf(0x0a, lf + 1)) {
    if (buf[lf - 1] !== 0x0d) return bad("a line not ended by CRLF");
  }
  // The request line, as soon as it is complete.
  const lineEnd = buf.indexOf("\r\n", i, "latin1");
  if (lineEnd >= 0) {
    const line = buf.toString("latin1", 0, lineEnd);
    if (line === "PRI * HTTP/2.0") return OTHER;
    if (!/^[A-Z]{1,20} [\x21-\x7e]+ HTTP\/1\.[01]$/.test(line)) return bad(`a request line that is not "METHOD target HTTP/1.x": ${JSON.stringify(line.slice(0, 80))}`);
  }
  const max = SNIFF_MAX_HEAD_BYTES;
  const end = headEnd(buf);
  if (end < 0) return buf.length > max ? bad(`an HTTP request head over ${max} bytes`) : MORE;
  if (end > max) return bad(`an HTTP request head over ${max} bytes`);
  const head = parseRequestHead(buf.subarray(0, end));
  if (typeof head === "string") return bad(head);
  const hosts = head.headers.filter((h) => h.name.toLowerCase() === "host");
  if (hosts.length > 1) return bad("an HTTP request with two Host headers");
  let host: string | undefined;
  if (hosts.length === 1) {
    const h = hostOf(hosts[0]!.value);
    if (typeof h !== "object") return bad(`a Host header that ${h}`);
    host = h.host;
  }
  // Servers take the host of an absolute-form target over Host (RFC 9112 3.2.2), and CONNECT
  // tunnels to its authority: it must be the same host.
  const authority = head.method === "CONNECT" ? head.target : /^[a-zA-Z][a-zA-Z0-9+.-]*:\/\/([^/?#]*)/.exec(head.target)?.[1];
  if (authority !== undefined) {
    const t = hostOf(authority.slice(authority.lastIndexOf("@") + 1));
    if (typeof t !== "object") return bad(`a request target whose host ${t}`);
    if (host !== undefined && t.host !== host) return bad("a request target and a Host header that name different hosts");
    host = t.host;
  }
  return { kind: "http", method: head.method, host };
}

/** `host`, `host:port`, `[v6]` or `[v6]:port` (a Host value): the host, lowercase, or why not. */
function hostOf(value: string): { host: string } | string {
  if (value === "") return "is empty";
  const split = splitHostPort(value);
  if ("error" in split) return split.error;
  if (split.port !== undefined && parsePort(split.port) === undefined) return `has port "${split.port.slice(0, 20)}", not a number from 1 to 65535`;
  const parsed = parseHost(split.host);
  if ("error" in parsed) return parsed.error;
  if (parsed.kind === "ip") {
    if ((parsed.family === 6) !== split.bracketed) return "has an IPv6 address without brackets, or brackets around something else";
    return { host: parsed.address };
  }
  if (split.bracketed) return "has brackets around something that is not an IPv6 address";
  return { host: parsed.host };
}
