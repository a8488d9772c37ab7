/**
 * One guest connection through the egress proxy (./egress.ts): read the request head (bounded in
 * size and time), check the target against the VM's policy before any DNS, resolve on the host
 * and connect to a checked address, then relay both ways with backpressure (a CONNECT tunnel) or
 * forward one plain HTTP request in origin form; or answer with an HTTP error saying why and
 * what to change. Budgets (connections, bytes) are the proxy's; this file only spends them.
 *
 * A transparent connection (the guest connected to an outside address itself) has no head: its
 * target is the address it connected to, checked by the name the guest's DNS gave that address
 * for, or by the IP rules; every refusal resets it instead of answering.
 */
import { connect as netConnect, type Socket } from "node:net";
import { finished, type Duplex } from "node:stream";
import { DEFAULT_PORTS, canonicalIp, parseHost, parsePort, showHostPort, splitHostPort } from "../schema/network.js";
import type { EgressProxy } from "./egress.js";
import { headEnd, parseRequestHead, parseResponseHead, serializeHead, withoutHopByHop, type RequestHead } from "./http-head.js";
import type { PolicyDecision } from "./policy.js";
import { sniff } from "./sniff.js";

export const EGRESS_DEFAULTS = {
  /** Largest request head the guest may send (431 beyond). */
  maxHeadBytes: 16 * 1024,
  /** Largest response head accepted from the outside (502 beyond). */
  maxResponseHeadBytes: 64 * 1024,
  /** Time for the guest to send a complete head (408 after). */
  headTimeoutMs: 30_000,
  /** Time to resolve and connect, all addresses together (504 after). */
  connectTimeoutMs: 10_000,
  /** How long a side whose peer has closed may take to finish (read the rest, send its EOF) before it is destroyed. */
  lingerMs: 10_000,
} as const;

export type ProxyStatus =
  | "http_request_denied"
  | "destination_ip_prohibited"
  | "connection_limit_reached"
  | "http_request_error"
  | "http_request_header_section_size"
  | "dns_error"
  | "connection_refused"
  | "connection_timeout"
  | "destination_unavailable"
  | "http_protocol_error"
  | "http_response_header_section_size"
  | "http_response_incomplete";

const REASONS: Record<number, string> = {
  400: "Bad Request",
  403: "Forbidden",
  408: "Request Timeout",
  429: "Too Many Requests",
  431: "Request Header Fields Too Large",
  502: "Bad Gateway",
  504: "Gateway Timeout",
};

const ACCEPTS =
  "the supermachine egress proxy accepts `CONNECT host:port HTTP/1.1` (https and other TCP) and plain HTTP requests in absolute form " +
  "(`GET http://host[:port]/path HTTP/1.1`); set HTTP_PROXY/HTTPS_PROXY to it (the guest's environment has them)";

class ConnectFailure extends Error {
  constructor(
    readonly status: 502 | 504,
    readonly proxyStatus: ProxyStatus,
    message: string,
  ) {
    super(message);
  }
}

type State = "head" | "connecting" | "relay" | "answering" | "done";

/** The agent's fake addresses for allowed names (198.18.0.0/15, RFC 2544's benchmarking range). */
export function isFakeAddress(address: string): boolean {
  const ip = canonicalIp(address);
  if (!ip || ip.family !== 4) return false;
  const [a, b] = ip.address.split(".").map(Number);
  return a === 198 && (b === 18 || b === 19);
}

/** One guest connection, from its head to the end of both directions. */
export class Flow {
  state: State = "head";
  holdsSlot = false;
  private head: Buffer = Buffer.alloc(0);
  private headTimer: NodeJS.Timeout | undefined;
  private lingerTimer: NodeJS.Timeout | undefined;
  private upstream: Socket | undefined;
  private pending: Socket | undefined;
  /** Bytes went to the guest (so an error can no longer be an HTTP answer). */
  private answered = false;
  private readonly closes: Promise<void>[] = [];
  private onHeadData = (chunk: Buffer) => this.headData(chunk);
  private onHeadEnd = () => this.headEnded();

  constructor(
    private readonly proxy: EgressProxy,
    readonly conn: Duplex,
    /** A transparent connection: no HTTP is spoken to the guest; refusals reset. */
    private readonly transparent = false,
  ) {
    this.closes.push(closed(conn));
    conn.on("error", () => this.destroy());
    conn.on("close", () => {
      if (this.state !== "done" && !(conn.readableEnded && conn.writableFinished)) this.destroy();
    });
  }

  start(): void {
    this.holdsSlot = true;
    this.headTimer = setTimeout(() => {
      this.headTimer = undefined;
      this.fail(408, "http_request_error", `the request head did not arrive within ${this.proxy.headTimeoutMs} ms`);
    }, this.proxy.headTimeoutMs);
    this.conn.on("data", this.onHeadData);
    this.conn.on("end", this.onHeadEnd);
  }

  /** A transparent connection to `dst` (`name`: the allowed name the guest's DNS gave that address for). */
  startTransparent(dst: { address: string; port: number }, name: string | undefined): void {
    this.holdsSlot = true;
    this.conn.pause();
    let host = name;
    if (host === undefined) {
      if (isFakeAddress(dst.address)) {
        const message = `supermachine: egress to ${showHostPort(dst.address, dst.port)} is not allowed: it is an address the guest's DNS gave a name that no longer holds it (resolve the name again)`;
        return this.answer(403, "http_request_denied", "stale-address", message);
      }
      host = dst.address;
    }
    const decision = this.proxy.policy.check(host, dst.port);
    if (!decision.allowed) return this.refuse(decision);
    const gated = name;
    void this.connectAndRelay(host, dst.port, (socket) => this.pump(socket, this.conn, "in"), gated === undefined ? undefined : (socket) => this.gate(socket, gated, dst.port));
  }

  refuseConnections(): void {
    const n = this.proxy.maxConnections;
    this.answer(429, "connection_limit_reached", "limit", `supermachine: egress refused: ${n} connection${n === 1 ? " is" : "s are"} already open (network.maxConnections is ${n}); close one, or raise network.maxConnections`);
  }

  refuseBytes(): void {
    this.answer(403, "http_request_denied", "limit", `supermachine: egress refused: this VM has carried network.maxBytes (${this.proxy.maxBytes} bytes, in and out); raise network.maxBytes`);
  }

  onExhausted(): void {
    if (this.state === "done" || this.state === "answering") return;
    if (!this.answered) {
      this.stopUpstream();
      this.refuseBytes();
      return;
    }
    // Mid-transfer: no HTTP answer is possible any more. A transparent connection is reset (a
    // protocol without its own framing must not take the cut for a clean end); through the
    // proxy port, end the guest's side and drop the outside.
    if (this.transparent) return void this.destroy();
    this.stopUpstream();
    this.state = "answering";
    this.closeGuest();
  }

  // ---- the head ----

  private headData(chunk: Buffer): void {
    const k = this.proxy.take("out", chunk.length);
    if (k < chunk.length) return; // exhausted: onExhausted answers
    const from = this.head.length;
    this.head = from === 0 ? chunk : Buffer.concat([this.head, chunk]);
    const end = headEnd(this.head, from);
    if (end < 0) {
      if (this.head.length > EGRESS_DEFAULTS.maxHeadBytes) this.fail(431, "http_request_header_section_size", `the request head is over ${EGRESS_DEFAULTS.maxHeadBytes} bytes`);
      return;
    }
    if (end > EGRESS_DEFAULTS.maxHeadBytes) {
      this.fail(431, "http_request_header_section_size", `the request head is over ${EGRESS_DEFAULTS.maxHeadBytes} bytes`);
      return;
    }
    this.stopHead();
    this.conn.pause();
    const rest = this.head.subarray(end);
    const head = this.head.subarray(0, end);
    this.head = Buffer.alloc(0);
    void this.request(head, rest);
  }

  private headEnded(): void {
    if (this.state !== "head") return;
    if (this.head.length === 0) {
      this.stopHead();
      this.state = "answering";
      this.closeGuest();
      return;
    }
    this.fail(400, "http_request_error", "the client closed its side before the request head was complete");
  }

  private stopHead(): void {
    if (this.headTimer) clearTimeout(this.headTimer);
    this.headTimer = undefined;
    this.conn.off("data", this.onHeadData);
    this.conn.off("end", this.onHeadEnd);
  }

  // ---- the request ----

  private async request(raw: Buffer, rest: Buffer): Promise<void> {
    const head = parseRequestHead(raw);
    if (typeof head === "string") return this.fail(400, "http_request_error", `the request has ${head}`);
    if (head.version !== "HTTP/1.1" && head.version !== "HTTP/1.0") return this.fail(400, "http_request_error", `the request is ${head.version}`);
    const target: { host: string; port: number; path?: string; hostHeader?: string } | { error: string } = head.method === "CONNECT" ? authorityForm(head.target) : absoluteForm(head);
    if ("error" in target) return this.fail(400, "http_request_error", target.error);
    const { host, port } = target;
    const decision = this.proxy.policy.check(host, port);
    if (!decision.allowed) return this.refuse(decision);
    await this.connectAndRelay(host, port, (socket) => {
      this.proxy.debug("%s %s -> %s:%d", head.method, showHostPort(host, port), socket.remoteAddress, port);
      if (head.method === "CONNECT") {
        this.toGuest(Buffer.from(`${head.version} 200 Connection established\r\n\r\n`, "latin1"), true);
        if (rest.length) socket.write(rest);
        this.pump(socket, this.conn, "in");
      } else {
        const headers = withoutHopByHop(head.headers).filter((h) => h.name.toLowerCase() !== "host");
        const out = serializeHead(`${head.method} ${target.path!} ${head.version}`, [{ name: "Host", value: target.hostHeader! }, ...headers, { name: "Connection", value: "close" }]);
        socket.write(rest.length ? Buffer.concat([out, rest]) : out);
        this.readResponse(socket);
      }
    });
  }

  /**
   * Resolves `host` (checked already), connects to a checked address and relays: `begin` starts
   * the upstream → guest direction (and may write first); guest → upstream follows. Failures
   * are answered (or, transparent, reset).
   */
  private async connectAndRelay(host: string, port: number, begin: (socket: Socket) => void, out?: (socket: Socket) => void): Promise<void> {
    this.state = "connecting";
    let socket: Socket;
    try {
      socket = await this.open(host, port);
    } catch (e) {
      if (this.state !== "connecting") return;
      if (e instanceof ConnectFailure) return this.fail(e.status, e.proxyStatus, e.message);
      if (isDecision(e)) return this.refuse(e);
      return this.fail(502, "destination_unavailable", `egress to ${showHostPort(host, port)} failed: ${(e as Error).message}`);
    }
    if (this.state !== "connecting") {
      socket.destroy();
      return;
    }
    this.upstream = socket;
    this.closes.push(closed(socket));
    this.state = "relay";
    socket.on("error", () => this.destroy());
    if (this.transparent) this.proxy.debug("transparent %s -> %s:%d", showHostPort(host, port), socket.remoteAddress, port);
    begin(socket);
    if (out) out(socket);
    else this.pump(this.conn, socket, "out");
    finished(this.conn, (err) => this.sideDone(err, this.conn, socket));
    finished(socket, (err) => this.sideDone(err, socket, this.conn));
    this.conn.resume();
  }

  /** Resolves and connects, within connectTimeoutMs; throws ConnectFailure or a refusal. */
  private async open(host: string, port: number): Promise<Socket> {
    const deadline = Date.now() + this.proxy.connectTimeoutMs;
    const parsed = parseHost(host.startsWith("[") ? host.slice(1, -1) : host);
    if ("error" in parsed) throw new ConnectFailure(502, "dns_error", `cannot resolve ${host}: it ${parsed.error}`);
    let addresses: string[];
    if (parsed.kind === "ip") addresses = [parsed.address];
    else {
      const mapped = this.proxy.policy.hostsEntry(parsed.host);
      if (mapped) addresses = [mapped];
      else {
        let timer: NodeJS.Timeout | undefined;
        try {
          const found = await Promise.race([
            this.proxy.resolveName(parsed.host),
            new Promise<never>((_, reject) => {
              timer = setTimeout(() => reject(new ConnectFailure(504, "dns_error", `resolving ${parsed.host} took over ${this.proxy.connectTimeoutMs} ms`)), this.proxy.connectTimeoutMs);
            }),
          ]);
          addresses = found.map((a) => a.address);
        } catch (e) {
          if (e instanceof ConnectFailure) throw e;
          throw new ConnectFailure(502, "dns_error", `cannot resolve ${parsed.host}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
        } finally {
          clearTimeout(timer);
        }
        if (addresses.length === 0) throw new ConnectFailure(502, "dns_error", `cannot resolve ${parsed.host}: no addresses`);
      }
    }
    const name = parsed.kind === "name" ? parsed.host : parsed.address;
    let firstRefusal: PolicyDecision | undefined;
    const usable: string[] = [];
    for (const a of addresses) {
      const d = this.proxy.policy.checkAddress(name, port, a);
      if (d.allowed) usable.push(a);
      else {
        firstRefusal ??= d;
        this.proxy.debug("not connecting %s to %s: %s", showHostPort(name, port), a, d.allowed ? "" : d.reason);
      }
    }
    if (usable.length === 0) throw firstRefusal!;
    const errors: string[] = [];
    for (const address of usable) {
      if (this.state !== "connecting") throw new Error("closed");
      const left = deadline - Date.now();
      if (left <= 0) break;
      try {
        return await this.attempt(address, port, left);
      } catch (e) {
        errors.push(`${showHostPort(address, port)}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
      }
    }
    if (Date.now() >= deadline) throw new ConnectFailure(504, "connection_timeout", `connecting to ${showHostPort(name, port)} took over ${this.proxy.connectTimeoutMs} ms (${errors.join("; ") || "no answer"})`);
    throw new ConnectFailure(502, errors.every((e) => e.endsWith("ECONNREFUSED")) ? "connection_refused" : "destination_unavailable", `cannot connect to ${showHostPort(name, port)} (${errors.join("; ")})`);
  }

  private attempt(address: string, port: number, timeoutMs: number): Promise<Socket> {
    return new Promise((resolve, reject) => {
      const socket = netConnect({ host: address, port, allowHalfOpen: true, noDelay: true });
      this.pending = socket;
      this.closes.push(closed(socket));
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error("ETIMEDOUT"));
      }, timeoutMs);
      socket.once("connect", () => {
        clearTimeout(timer);
        this.pending = undefined;
        socket.removeAllListeners("error");
        resolve(socket);
      });
      socket.once("error", (e) => {
        clearTimeout(timer);
        this.pending = undefined;
        socket.destroy();
        reject(e);
      });
      socket.once("close", () => {
        clearTimeout(timer);
        if (this.pending === socket) this.pending = undefined;
        reject(new Error("closed"));
      });
    });
  }

  // ---- relay ----

  /**
   * Guest → upstream of a transparent connection to `name`'s address: the first bytes are held
   * until they show which name the client asks the server for (TLS SNI, HTTP Host; sniff.ts). A
   * name other than `name` must be allowed on `port` too, or the connection is reset; bytes that
   * are neither TLS nor HTTP go through as they are (the address is the allowed name's anyway).
   */
  private gate(socket: Socket, name: string, port: number): void {
    let held: Buffer = Buffer.alloc(0);
    const decide = (ended: boolean) => {
      const s = sniff(held);
      if (s.kind === "more" && !ended) return;
      this.conn.off("data", onData);
      this.conn.off("end", onEnd);
      const target = showHostPort(name, port);
      if (s.kind === "bad") return this.fail(400, "http_request_error", `the connection to ${target} starts with ${s.reason}`);
      if (s.kind === "more") return this.fail(400, "http_request_error", `the client closed its side of the connection to ${target} before its first message was complete`);
      const asked = s.kind === "tls" ? s.sni : s.kind === "http" ? s.host : undefined;
      if (asked !== undefined && asked !== name && !this.proxy.policy.check(asked, port).allowed) {
        const what = s.kind === "tls" ? "TLS server name (SNI)" : "HTTP Host";
        return this.answer(
          403,
          "http_request_denied",
          "name-mismatch",
          `supermachine: egress to ${target} is not allowed to ask for ${showHostPort(asked, port)} (its ${what}): network.allow does not list it; add "${showHostPort(asked, DEFAULT_PORTS.includes(port) ? undefined : port)}" to network.allow`,
        );
      }
      if (held.length) socket.write(held);
      if (ended) socket.end();
      else this.pump(this.conn, socket, "out");
    };
    const onData = (chunk: Buffer) => {
      if (this.state !== "relay") return;
      if (this.proxy.take("out", chunk.length) < chunk.length) return; // maxBytes: onExhausted ends it
      held = held.length ? Buffer.concat([held, chunk]) : chunk;
      decide(false);
    };
    const onEnd = () => {
      if (this.state === "relay") decide(true);
    };
    this.conn.on("data", onData);
    this.conn.on("end", onEnd);
  }

  /** Upstream → guest for plain HTTP: the response head(s) rewritten (hop-by-hop out, `Connection: close`), then raw. */
  private readResponse(socket: Socket): void {
    let buf: Buffer = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      let from = buf.length;
      buf = from === 0 ? chunk : Buffer.concat([buf, chunk]);
      for (;;) {
        const end = headEnd(buf, from);
        if (end < 0) {
          if (buf.length > EGRESS_DEFAULTS.maxResponseHeadBytes) return this.upstreamFailed("http_response_header_section_size", `the response head is over ${EGRESS_DEFAULTS.maxResponseHeadBytes} bytes`);
          return;
        }
        const head = parseResponseHead(buf.subarray(0, end));
        if (typeof head === "string") return this.upstreamFailed("http_protocol_error", `the response has ${head}`);
        const interim = head.status >= 100 && head.status < 200 && head.status !== 101;
        const headers = interim ? head.headers : [...withoutHopByHop(head.headers), { name: "Connection", value: "close" }];
        const rest = buf.subarray(end);
        if (!this.toGuest(serializeHead(`${head.version} ${head.status}${head.reason ? ` ${head.reason}` : ""}`, headers), false)) return;
        if (interim) {
          buf = rest;
          from = 0;
          if (buf.length === 0) return;
          continue;
        }
        socket.off("data", onData);
        socket.off("end", onEnd);
        if (rest.length) this.toGuest(rest, false);
        this.pump(socket, this.conn, "in");
        return;
      }
    };
    const onEnd = () => this.upstreamFailed("http_response_incomplete", "the server closed the connection before a complete response head");
    socket.on("data", onData);
    socket.on("end", onEnd);
  }

  private upstreamFailed(status: ProxyStatus, why: string): void {
    if (this.state !== "relay") return;
    if (this.answered) return void this.destroy();
    this.stopUpstream();
    this.fail(502, status, why);
  }

  /** Writes bytes to the guest within maxBytes (`force`: the proxy's own, counted but not capped); false when nothing more may go. */
  private toGuest(bytes: Buffer, force: boolean): boolean {
    if (force) this.proxy.count("in", bytes.length);
    else {
      const k = this.proxy.take("in", bytes.length);
      if (k < bytes.length) {
        if (k > 0) this.conn.write(bytes.subarray(0, k));
        this.answered = true;
        return false;
      }
    }
    this.answered = true;
    this.conn.write(bytes);
    return true;
  }

  /** src → dst with backpressure and the byte cap; src's end ends dst. */
  private pump(src: Duplex, dst: Duplex, dir: "in" | "out"): void {
    let waiting = false;
    src.on("data", (chunk: Buffer) => {
      if (this.state !== "relay") return;
      const k = this.proxy.take(dir, chunk.length);
      if (k === 0) return;
      if (dir === "in") this.answered = true;
      if (dst.writableEnded || dst.destroyed) return;
      const ok = dst.write(k < chunk.length ? chunk.subarray(0, k) : chunk);
      if (!ok && !waiting) {
        waiting = true;
        src.pause();
        dst.once("drain", () => {
          waiting = false;
          if (this.state === "relay") src.resume();
        });
      }
    });
    src.on("end", () => {
      if (!dst.writableEnded && !dst.destroyed) dst.end();
    });
  }

  /** One side of a relay ended: on an error both go; cleanly, the other side gets lingerMs to finish. */
  private sideDone(err: Error | null | undefined, side: Duplex, other: Duplex): void {
    if (this.state !== "relay") return;
    if (err) return void this.destroy();
    if (other.readableEnded && other.writableFinished) return void this.destroy();
    void side;
    this.linger();
  }

  // ---- answers ----

  private refuse(d: PolicyDecision): void {
    if (d.allowed) return;
    if (d.reason === "bad-host") return this.fail(400, "http_request_error", d.message.replace(/^supermachine: /, ""));
    this.answer(403, d.reason === "private-address" ? "destination_ip_prohibited" : "http_request_denied", d.reason, d.message);
  }

  private fail(status: 400 | 408 | 431 | 502 | 504, proxyStatus: ProxyStatus, why: string): void {
    const body = status === 400 || status === 431 ? `supermachine: bad request: ${why}; ${ACCEPTS}` : `supermachine: ${why}`;
    this.answer(status, proxyStatus, proxyStatus, body);
  }

  /**
   * Sends the proxy's own answer, ends the guest's side and waits (lingerMs at most) for its EOF.
   * A transparent connection has nobody to read an answer: it is counted, logged and reset.
   */
  private answer(status: number, proxyStatus: ProxyStatus, reason: string, message: string): void {
    if (this.state === "answering" || this.state === "done") return;
    this.stopHead();
    this.stopUpstream();
    this.state = "answering";
    this.proxy.refused(status, reason, message);
    if (this.transparent) {
      void this.destroy();
      return;
    }
    const body = Buffer.from(`${message}\n`, "utf8");
    const head =
      `HTTP/1.1 ${status} ${REASONS[status] ?? "Error"}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ${body.length}\r\n` +
      `Proxy-Status: supermachine; error=${proxyStatus}\r\nConnection: close\r\n\r\n`;
    const bytes = Buffer.concat([Buffer.from(head, "latin1"), body]);
    this.proxy.count("in", bytes.length);
    this.answered = true;
    this.closeGuest(bytes);
  }

  /** Ends the guest's side (after `bytes`), reads and drops what it still sends (so closing does not reset the answer away), and is done at its EOF or after lingerMs. */
  private closeGuest(bytes?: Buffer): void {
    this.conn.removeAllListeners("data");
    this.conn.on("data", (c: Buffer) => this.proxy.count("out", c.length));
    if (bytes) this.conn.end(bytes);
    else this.conn.end();
    this.conn.resume();
    finished(this.conn, () => void this.destroy());
    this.linger();
  }

  private linger(): void {
    if (this.lingerTimer || this.state === "done") return;
    this.lingerTimer = setTimeout(() => this.destroy(), this.proxy.lingerMs);
  }

  private stopUpstream(): void {
    this.pending?.destroy();
    this.pending = undefined;
    this.upstream?.destroy();
  }

  /** Ends everything of this connection; resolves when its sockets are closed. */
  destroy(): Promise<void> {
    if (this.state !== "done") {
      this.state = "done";
      this.stopHead();
      if (this.lingerTimer) clearTimeout(this.lingerTimer);
      this.lingerTimer = undefined;
      this.pending?.destroy();
      this.pending = undefined;
      this.upstream?.destroy();
      this.conn.destroy();
      this.holdsSlot = false;
      this.proxy.forget(this);
    }
    return Promise.all(this.closes).then(() => undefined);
  }
}

function closed(s: Duplex): Promise<void> {
  if (s.closed) return Promise.resolve();
  return new Promise((resolve) => s.once("close", () => resolve()));
}

function isDecision(e: unknown): e is PolicyDecision {
  return typeof e === "object" && e !== null && "allowed" in e && (e as PolicyDecision).allowed === false;
}

/** `host:port` of a CONNECT (port required). */
function authorityForm(target: string): { host: string; port: number } | { error: string } {
  if (target.includes("/") || target.includes("@")) return { error: `CONNECT needs host:port, got ${JSON.stringify(target.slice(0, 100))}` };
  const split = splitHostPort(target);
  if ("error" in split) return { error: `the CONNECT target ${JSON.stringify(target.slice(0, 100))} ${split.error}` };
  if (split.port === undefined) return { error: `CONNECT needs host:port (with a port), got ${JSON.stringify(target.slice(0, 100))}` };
  const port = parsePort(split.port);
  if (port === undefined) return { error: `the CONNECT target ${JSON.stringify(target.slice(0, 100))} has no valid port` };
  if (!split.bracketed && split.host.includes(":")) return { error: "an IPv6 address in a CONNECT target must be in brackets ([::1]:443)" };
  return { host: split.host, port };
}

/** `http://host[:port]/path?query` → host, port, the origin-form path and the Host header. */
function absoluteForm(head: RequestHead): { host: string; port: number; path: string; hostHeader: string } | { error: string } {
  const t = head.target;
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//i.exec(t);
  if (!scheme) {
    return { error: t.startsWith("/") ? `${head.method} ${t.slice(0, 100)} is an origin-form request, sent to the proxy as if it were the server` : `the request target ${JSON.stringify(t.slice(0, 100))} is not an absolute http:// URL` };
  }
  if (scheme[1]!.toLowerCase() !== "http") return { error: `${scheme[1]}:// requests are not proxied as plain requests (use CONNECT for https)` };
  const after = t.slice(scheme[0].length);
  const cut = after.search(/[/?#]/);
  const authority = cut < 0 ? after : after.slice(0, cut);
  let path = cut < 0 ? "/" : after.slice(cut);
  const hash = path.indexOf("#");
  if (hash >= 0) path = path.slice(0, hash);
  if (path === "" || path.startsWith("?")) path = `/${path}`;
  if (authority.includes("@")) return { error: "user credentials in the URL are not supported" };
  const split = splitHostPort(authority);
  if ("error" in split) return { error: `the URL's host ${split.error}` };
  if (!split.bracketed && split.host.includes(":")) return { error: "an IPv6 address in a URL must be in brackets (http://[::1]/)" };
  let port = 80;
  if (split.port !== undefined && split.port !== "") {
    const p = parsePort(split.port);
    if (p === undefined) return { error: `the URL's port ${JSON.stringify(split.port)} is not from 1 to 65535` };
    port = p;
  }
  const host = split.host.toLowerCase();
  const shown = split.bracketed ? `[${host}]` : host;
  return { host, port, path, hostHeader: port === 80 ? shown : `${shown}:${port}` };
}
