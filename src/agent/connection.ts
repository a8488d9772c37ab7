/**
 * Requests and their answers over one agent connection: the table of operations in flight by
 * stream id, ids allocated below the agent's own (PROTOCOL.md: PROXY_CONN streams are the
 * agent's), frames routed to the operation they belong to, and the connection-level messages
 * (HELLO_OK, PONG, GOAWAY, PROXY_CONN, RESOLVE). `request()` is the one way a request answered with OK
 * is sent and awaited; streams that live longer are opened with `open()`.
 */
import { logger } from "../debug.js";
import { AgentError } from "../errors.js";
import type { HelloInfo, ProxyConnHandler, ResolveAnswer, ResolveHandler } from "./messages.js";
import { AGENT_STREAM_BASE, FieldWriter, Fields, type Frame, Msg, PROTOCOL_VERSION, StreamErrorCode, Tag } from "./protocol.js";
import { RequestOp, TcpStream, type StreamOp } from "./streams.js";
import { AgentTransport } from "./transport.js";

const log = logger("agent");

export abstract class AgentConnection extends AgentTransport {
  private readonly streams = new Map<number, StreamOp>();
  protected readonly pings = new Map<number, (payload: Buffer) => void>();
  private nextId = 1;
  /** Who takes PROXY_CONN streams while the agent's proxy listener is up (proxyListen). */
  protected proxyHandler: ProxyConnHandler | undefined;
  /** Who decides RESOLVE requests while transparent egress is up (proxyListen's onResolve). */
  protected resolveHandler: ResolveHandler | undefined;
  protected helloWaiter: { resolve: (h: HelloInfo) => void; reject: (e: Error) => void } | undefined;

  /** Streams in flight (diagnostics, tests). */
  get openStreams(): number {
    return this.streams.size;
  }

  protected busy(): boolean {
    return this.streams.size + this.pings.size + (this.helloWaiter ? 1 : 0) > 0;
  }

  protected failAll(err: Error): void {
    this.helloWaiter?.reject(err);
    this.helloWaiter = undefined;
    for (const op of this.streams.values()) op.fail(err);
    this.streams.clear();
    this.pings.clear();
  }

  protected onFrame(frame: Frame): void {
    switch (frame.type) {
      case Msg.HELLO_OK: {
        const info = helloInfo(frame);
        // A wrong version fails the connection, and with it the HELLO waiting for this answer.
        if (info.version !== PROTOCOL_VERSION) {
          throw new AgentError("AGENT_VERSION", `agent chose protocol version ${info.version}, host speaks ${PROTOCOL_VERSION}`);
        }
        const w = this.helloWaiter;
        this.helloWaiter = undefined;
        this.settle();
        w?.resolve(info);
        return;
      }
      case Msg.PONG: {
        const cb = this.pings.get(frame.stream);
        if (cb) {
          this.pings.delete(frame.stream);
          cb(frame.payload);
        }
        return;
      }
      case Msg.GOAWAY: {
        const f = new Fields(frame.payload, "GOAWAY");
        const code = StreamErrorCode[f.u32(Tag.goaway.code) ?? 0] ?? "PROTOCOL";
        throw new AgentError(`AGENT_${code}`, `agent ended the connection: ${f.string(Tag.goaway.message) ?? code}`);
      }
      case Msg.PROXY_CONN:
        this.onProxyConn(frame);
        return;
      case Msg.RESOLVE:
        this.onResolve(frame);
        return;
      default: {
        const op = this.streams.get(frame.stream);
        if (!op) {
          log("frame type %d for unknown stream %d dropped", frame.type, frame.stream);
          return;
        }
        try {
          op.onFrame(frame);
        } catch (err) {
          // The connection fails with this; the operation too, even if it already let go of
          // its id (an answer whose fields do not parse).
          op.fail(err as Error);
          throw err;
        }
      }
    }
  }

  /**
   * A connection the guest made to the agent's proxy listener: a stream the agent opened. With
   * nobody listening on this side (a PROXY_CONN racing with PROXY_STOP) it is cancelled.
   */
  private onProxyConn(frame: Frame): void {
    const id = frame.stream;
    if (id < AGENT_STREAM_BASE) throw new AgentError("AGENT_PROTOCOL", `PROXY_CONN on stream ${id}, below the agent's ids (${AGENT_STREAM_BASE})`);
    if (this.streams.has(id)) throw new AgentError("AGENT_PROTOCOL", `PROXY_CONN on stream ${id}, which is open`);
    const fields = new Fields(frame.payload, "PROXY_CONN");
    const peerPort = fields.u16(Tag.proxyConn.peerPort) ?? 0;
    const dst = proxyConnDst(fields.bytes(Tag.proxyConn.dstAddr), fields.u16(Tag.proxyConn.dstPort));
    const handler = this.proxyHandler;
    const op = new TcpStream(this, id, true);
    this.streams.set(id, op);
    if (!handler) {
      log("proxy connection %d from guest port %d while not listening: cancelled", id, peerPort);
      op.done.catch(() => {});
      op.abandon(new AgentError("AGENT_PROXY_STOPPED", "the host is not serving the guest's proxy"));
      return;
    }
    this.settle();
    const name = fields.string(Tag.proxyConn.name);
    handler(op, { peerPort, ...(dst ? { dst } : {}), ...(name !== undefined ? { name } : {}) });
  }

  /**
   * A DNS question of the guest's (transparent egress): the handler decides, and the answer is
   * the id's one OK. With no handler, or one that fails, the answer is SERVFAIL (not cached).
   * The id is not kept as a stream: the agent sends nothing else on it.
   */
  private onResolve(frame: Frame): void {
    const id = frame.stream;
    if (id < AGENT_STREAM_BASE) throw new AgentError("AGENT_PROTOCOL", `RESOLVE on stream ${id}, below the agent's ids (${AGENT_STREAM_BASE})`);
    const fields = new Fields(frame.payload, "RESOLVE");
    const name = fields.string(Tag.resolve.name) ?? "";
    const qtype = fields.u16(Tag.resolve.qtype) ?? 0;
    const handler = this.resolveHandler;
    const servfail: ResolveAnswer = { verdict: "servfail", ttl: 0 };
    const answered = handler ? handler({ name, qtype }).catch((err: Error) => {
      log("RESOLVE %s failed on the host: %s", name, err.message);
      return servfail;
    }) : Promise.resolve(servfail);
    void answered.then((a) => {
      const w = new FieldWriter().u8(Tag.resolveOk.verdict, RESOLVE_VERDICTS[a.verdict]).u32(Tag.resolveOk.ttl, Math.max(0, Math.floor(a.ttl)));
      for (const p of a.ports ?? []) w.u16(Tag.resolveOk.ports, p);
      this.trySend(Msg.OK, id, w.finish());
    });
  }

  /** @internal */
  forget(id: number): void {
    this.streams.delete(id);
    this.settle();
  }

  protected allocId(): number {
    for (;;) {
      const id = this.nextId;
      // Ids from AGENT_STREAM_BASE up are the agent's (PROXY_CONN).
      this.nextId = this.nextId >= AGENT_STREAM_BASE - 1 ? 1 : this.nextId + 1;
      if (!this.streams.has(id) && !this.pings.has(id)) return id;
    }
  }

  /** Registers a stream operation made for a fresh id and sends its opening frame. */
  protected open<T extends StreamOp>(make: (id: number) => T, type: number, payload: Buffer): T {
    this.checkAlive();
    const op = make(this.allocId());
    this.streams.set(op.id, op);
    this.settle();
    this.send(type, op.id, payload);
    return op;
  }

  /** A request answered with OK: opens it and resolves with the OK's fields (rejects with its STREAM_ERROR). */
  protected request(type: number, what: string, payload: Buffer = Buffer.alloc(0)): Promise<Fields> {
    return this.open((id) => new RequestOp(this, id, what), type, payload).result;
  }
}

const RESOLVE_VERDICTS: Record<ResolveAnswer["verdict"], number> = { allow: 0, nxdomain: 1, refused: 2, servfail: 3 };

function helloInfo(frame: Frame): HelloInfo {
  const f = new Fields(frame.payload, "HELLO_OK");
  const info: HelloInfo = {
    version: f.u16(Tag.helloOk.version) ?? 0,
    agentVersion: f.string(Tag.helloOk.agentVersion) ?? "unknown",
    uptimeMs: Number(f.u64(Tag.helloOk.uptimeMs) ?? 0n),
    features: (f.string(Tag.helloOk.features) ?? "").split(",").filter(Boolean),
    port: f.string(Tag.helloOk.port),
    vmId: f.string(Tag.helloOk.vmId),
    limits: undefined,
  };
  const pidsMax = f.u32(Tag.helloOk.defaultPidsMax);
  const memoryMax = f.u64(Tag.helloOk.defaultMemoryMax);
  if (pidsMax !== undefined && memoryMax !== undefined) info.limits = { pidsMax, memoryMaxBytes: Number(memoryMax) };
  return info;
}

/**
 * A transparent PROXY_CONN's destination: 4 or 16 raw address bytes as text, and the port. A
 * wrong length means a broken agent, which fails the connection like any malformed frame.
 */
export function proxyConnDst(addr: Buffer | undefined, port: number | undefined): { address: string; port: number } | undefined {
  if (addr === undefined) return undefined;
  if (port === undefined) throw new AgentError("AGENT_PROTOCOL", "PROXY_CONN has dst_addr but no dst_port");
  if (addr.length === 4) return { address: [...addr].join("."), port };
  if (addr.length !== 16) throw new AgentError("AGENT_PROTOCOL", `PROXY_CONN dst_addr is ${addr.length} bytes, not 4 or 16`);
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(addr.readUInt16BE(i).toString(16));
  // Compress the longest run of two or more zero groups, as RFC 5952 writes it.
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    let j = i;
    while (j < 8 && groups[j] === "0") j++;
    if (j - i > bestLen) [best, bestLen] = [i, j - i];
    i = j === i ? i + 1 : j;
  }
  const address = best < 0 ? groups.join(":") : `${groups.slice(0, best).join(":")}::${groups.slice(best + bestLen).join(":")}`;
  return { address, port };
}
