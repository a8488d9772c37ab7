/**
 * A TCP proxy that makes loopback look like a wide-area link: every piece of data, in each
 * direction, is delivered `delayMs` after it arrived (order kept, no bandwidth limit), so a round
 * trip costs 2 × delayMs. It counts connections and bytes each way and reads the client's byte
 * stream as HTTP/1.1 requests to list each request's method and path (a TLS handshake, such as
 * the client's HTTPS probe of a loopback registry, is listed as method "TLS": it is an exchange
 * the client's own request count includes).
 *
 * Being TCP-level, it forwards the Host header the client wrote (the proxy's own address), so a
 * registry behind it names the proxy in its Location headers and every request of a push, upload
 * pieces included, goes through it (the HTTP proxy of registry.ts rewrites Host and loses them).
 *
 * `cut` breaks one connection, once, after `afterUploadBytes` client→server bytes in all: the
 * bytes up to that point reach the server, then both sides are closed (the client's with a reset).
 * With `beforeBody` the cut moves back to the start of the body of the request the threshold
 * falls in (or of the first request after it): the server gets that request's head and none of
 * its body, as when a front end refuses a request before reading it.
 */
import net from "node:net";
import type { AddressInfo } from "node:net";
import { performance } from "node:perf_hooks";

export interface WanProxyOptions {
  /** `127.0.0.1:PORT` of the server behind the proxy. */
  target: string;
  /** Delay added to each direction. */
  delayMs: number;
  cut?: { afterUploadBytes: number; beforeBody?: boolean };
}

export interface WanStats {
  connections: number;
  /** Client → server bytes received by the proxy. */
  bytesUp: number;
  /** Server → client bytes received by the proxy. */
  bytesDown: number;
  requests: Array<{ method: string; path: string }>;
  /** Connections cut (0 or 1). */
  cuts: number;
}

export interface WanProxy {
  /** `127.0.0.1:PORT` of the proxy. */
  host: string;
  port: number;
  stats: WanStats;
  /** Zeroes the statistics (the cut, once done, stays done). */
  reset(): void;
  /** Ends every connection and the server. */
  close(): Promise<void>;
}

type Item = { at: number } & ({ data: Buffer } | { end: true } | { destroy: true });

/** Delivers what is pushed `delayMs` later, in order. */
class DelayLine {
  private queue: Item[] = [];
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly delayMs: number,
    private readonly deliver: (item: Item) => void,
  ) {}

  push(item: { data: Buffer } | { end: true } | { destroy: true }): void {
    this.queue.push({ ...item, at: performance.now() + this.delayMs });
    if (!this.timer) this.schedule();
  }

  clear(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.queue = [];
  }

  private schedule(): void {
    const head = this.queue[0];
    if (!head) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      const now = performance.now();
      while (this.queue.length > 0 && this.queue[0]!.at <= now) this.deliver(this.queue.shift()!);
      this.schedule();
    }, Math.max(0, Math.ceil(head.at - performance.now())));
  }
}

const MAX_HEAD = 64 * 1024;

/**
 * Reads a client's byte stream as HTTP/1.1 requests: head up to CRLFCRLF, then the body by
 * Content-Length or chunked coding. Gives up on the connection at anything else (a TLS hello).
 */
class RequestParser {
  private state: "head" | "body" | "chunk-size" | "chunk-data" | "chunk-crlf" | "trailer" | "dead" = "head";
  private head = Buffer.alloc(0);
  private line = "";
  private remaining = 0;

  constructor(private readonly onRequest: (method: string, path: string, headEnd: number, bodyLength: number | undefined) => void) {}

  /** `chunk` starts at stream position `pos` (counted over all connections). */
  feed(chunk: Buffer, pos: number): void {
    let i = 0;
    while (i < chunk.length && this.state !== "dead") {
      switch (this.state) {
        case "head": {
          const before = this.head.length;
          const buf = before ? Buffer.concat([this.head, chunk.subarray(i)]) : chunk.subarray(i);
          if (buf[0] === 0x16) {
            // A TLS handshake: a client probing for HTTPS. One exchange, then the connection ends.
            this.onRequest("TLS", "", pos + i, undefined);
            this.state = "dead";
            break;
          }
          if (!/[A-Z]/.test(String.fromCharCode(buf[0]!))) {
            this.state = "dead";
            break;
          }
          const idx = buf.indexOf("\r\n\r\n");
          if (idx < 0) {
            if (buf.length > MAX_HEAD) this.state = "dead";
            else this.head = Buffer.from(buf);
            i = chunk.length;
            break;
          }
          i += idx + 4 - before;
          this.head = Buffer.alloc(0);
          const [requestLine = "", ...headerLines] = buf.subarray(0, idx).toString("latin1").split("\r\n");
          const m = /^([A-Z]+) (\S+) HTTP\/1\.[01]$/.exec(requestLine);
          if (!m) {
            this.state = "dead";
            break;
          }
          const headers = new Map(headerLines.map((l) => [l.slice(0, l.indexOf(":")).trim().toLowerCase(), l.slice(l.indexOf(":") + 1).trim()]));
          const chunked = /\bchunked\b/i.test(headers.get("transfer-encoding") ?? "");
          const length = chunked ? undefined : Number(headers.get("content-length") ?? "0");
          this.onRequest(m[1]!, m[2]!, pos + i, length);
          if (chunked) {
            this.state = "chunk-size";
            this.line = "";
          } else if (length !== undefined && Number.isSafeInteger(length) && length > 0) {
            this.state = "body";
            this.remaining = length;
          } else if (length !== 0) {
            this.state = "dead";
          }
          break;
        }
        case "body":
        case "chunk-data": {
          const take = Math.min(this.remaining, chunk.length - i);
          i += take;
          this.remaining -= take;
          if (this.remaining === 0) {
            if (this.state === "body") this.state = "head";
            else {
              this.state = "chunk-crlf";
              this.remaining = 2;
            }
          }
          break;
        }
        case "chunk-crlf": {
          const take = Math.min(this.remaining, chunk.length - i);
          i += take;
          this.remaining -= take;
          if (this.remaining === 0) {
            this.state = "chunk-size";
            this.line = "";
          }
          break;
        }
        case "chunk-size":
        case "trailer": {
          const nl = chunk.indexOf(10, i);
          const end = nl < 0 ? chunk.length : nl + 1;
          this.line += chunk.subarray(i, end).toString("latin1");
          i = end;
          if (this.line.length > 4096) {
            this.state = "dead";
            break;
          }
          if (nl < 0) break;
          const text = this.line.trim();
          this.line = "";
          if (this.state === "trailer") {
            if (text === "") this.state = "head";
          } else {
            const size = parseInt(text.split(";")[0]!, 16);
            if (!Number.isSafeInteger(size) || size < 0) this.state = "dead";
            else if (size === 0) this.state = "trailer";
            else {
              this.state = "chunk-data";
              this.remaining = size;
            }
          }
          break;
        }
      }
    }
  }
}

/** Starts the proxy on 127.0.0.1 (a free port). */
export async function startWanProxy(opts: WanProxyOptions): Promise<WanProxy> {
  const [thost, tport] = opts.target.split(":");
  const stats: WanStats = { connections: 0, bytesUp: 0, bytesDown: 0, requests: [], cuts: 0 };
  /** Client → server bytes since the start (not reset): where the cut is measured. */
  let uploaded = 0;
  let cutArmed = opts.cut !== undefined;
  const open = new Set<{ client: net.Socket; upstream: net.Socket; up: DelayLine; down: DelayLine }>();

  const server = net.createServer((client) => {
    stats.connections++;
    const upstream = net.connect(Number(tport), thost!);
    /** Writes to `dst`, holding `src` back while `dst` is full. */
    const sink = (src: net.Socket, dst: net.Socket) => {
      let waiting = false;
      return (item: Item) => {
        if (dst.destroyed) return;
        if ("data" in item) {
          if (!dst.write(item.data) && !waiting) {
            waiting = true;
            src.pause();
            dst.once("drain", () => {
              waiting = false;
              src.resume();
            });
          }
        } else if ("end" in item) dst.end();
        // Closed once what was written before has gone out.
        else dst.end(() => dst.destroy());
      };
    };
    const up = new DelayLine(opts.delayMs, sink(client, upstream));
    const down = new DelayLine(opts.delayMs, sink(upstream, client));
    const conn = { client, upstream, up, down };
    open.add(conn);
    let cut = false;
    let cutAt: number | undefined;
    const parser = new RequestParser((method, path, headEnd, bodyLength) => {
      stats.requests.push({ method, path });
      const c = opts.cut;
      if (cutArmed && c?.beforeBody && cutAt === undefined && headEnd + (bodyLength ?? 0) > c.afterUploadBytes) cutAt = headEnd;
    });

    client.on("data", (chunk: Buffer) => {
      if (cut) return;
      const start = uploaded;
      uploaded += chunk.length;
      stats.bytesUp += chunk.length;
      parser.feed(chunk, start);
      const at = cutArmed ? (opts.cut!.beforeBody ? cutAt : opts.cut!.afterUploadBytes) : undefined;
      if (at === undefined || at >= start + chunk.length) {
        up.push({ data: chunk });
        return;
      }
      // The cut: what came before it still reaches the server, then both sides close.
      cutArmed = false;
      cut = true;
      stats.cuts++;
      const part = chunk.subarray(0, Math.max(0, at - start));
      if (part.length) up.push({ data: part });
      up.push({ destroy: true });
      down.clear();
      client.resetAndDestroy();
    });
    upstream.on("data", (chunk: Buffer) => {
      if (cut) return;
      stats.bytesDown += chunk.length;
      down.push({ data: chunk });
    });
    client.on("end", () => up.push({ end: true }));
    upstream.on("end", () => down.push({ end: true }));
    let closed = 0;
    const onClose = () => {
      if (++closed === 2) open.delete(conn);
    };
    client.on("close", () => {
      if (!cut) up.push({ destroy: true });
      onClose();
    });
    upstream.on("close", () => {
      down.push({ destroy: true });
      onClose();
    });
    client.on("error", () => {});
    upstream.on("error", () => {});
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    host: `127.0.0.1:${port}`,
    port,
    stats,
    reset() {
      stats.connections = 0;
      stats.bytesUp = 0;
      stats.bytesDown = 0;
      stats.requests.length = 0;
      stats.cuts = 0;
    },
    async close() {
      for (const c of open) {
        c.up.clear();
        c.down.clear();
        c.client.destroy();
        c.upstream.destroy();
      }
      open.clear();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
