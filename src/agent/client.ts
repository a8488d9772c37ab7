/**
 * A connection to one guest agent: multiplexes exec, file and ping operations over the
 * virtio-serial byte stream, with per-channel flow control (PROTOCOL.md section 3).
 *
 * The guest is untrusted: every frame it sends is validated, and any violation (oversized or
 * garbled frame, data beyond the granted window) fails the whole connection; the VM that owns
 * it is then torn down by its owner.
 */
import { EventEmitter } from "node:events";
import type { Duplex } from "node:stream";
import { AgentError } from "../errors.js";
import { logger } from "../log.js";
import {
  Channel,
  CHANNEL_MASK,
  DATA_CHUNK,
  encodeFrame,
  FieldWriter,
  Fields,
  FLAG_EOF,
  type Frame,
  FrameDecoder,
  INITIAL_WINDOW,
  MAX_PING_PAYLOAD,
  Msg,
  PROTOCOL_VERSION,
  StreamErrorCode,
  Tag,
  windowPayload,
} from "./protocol.js";

const log = logger("agent");

export interface HelloInfo {
  version: number;
  agentVersion: string;
  uptimeMs: number;
  features: string[];
}

export interface ExecRequest {
  argv: string[];
  /** Complete environment, `KEY=VALUE` (the caller merges image and call env). */
  env: string[];
  cwd?: string;
  timeoutMs?: number;
  uid?: number;
  gid?: number;
  /** When true the process reads stdin from `ExecStream.write`; otherwise /dev/null. */
  stdin?: boolean;
}

export interface ExitInfo {
  exitCode: number;
  signal: number;
  timedOut: boolean;
  peakRssKib: number | null;
  durationUs: number;
}

/** Base for operations that own a stream id until the agent ends it. */
abstract class StreamOp {
  ended = false;
  constructor(
    protected readonly client: AgentClient,
    readonly id: number,
  ) {}
  abstract onFrame(frame: Frame): void;
  abstract fail(err: Error): void;
  protected end(): void {
    this.ended = true;
    this.client.forget(this.id);
  }
  protected streamError(frame: Frame, what: string): AgentError {
    const f = new Fields(frame.payload, "STREAM_ERROR");
    const code = f.u32(Tag.streamError.code) ?? 0;
    const name = StreamErrorCode[code] ?? `code ${code}`;
    const message = f.string(Tag.streamError.message) ?? "";
    return new AgentError(`AGENT_${name}`, `${what}: ${message || name}`);
  }
}

/** Send side of one channel: respects the peer's window. */
class SendWindow {
  private credit = INITIAL_WINDOW;
  private waiters: Array<() => void> = [];

  grant(n: number): void {
    this.credit += n;
    const w = this.waiters;
    this.waiters = [];
    for (const fn of w) fn();
  }
  /** Resolves when at least one byte may be sent; returns how many. */
  async acquire(want: number, isDead: () => Error | undefined): Promise<number> {
    while (this.credit <= 0) {
      const dead = isDead();
      if (dead) throw dead;
      await new Promise<void>((r) => this.waiters.push(r));
    }
    const n = Math.min(want, this.credit);
    this.credit -= n;
    return n;
  }
  wake(): void {
    this.grant(0);
  }
}

/**
 * A running process in the guest. Output is delivered through the `onStdout`/`onStderr`
 * callbacks; with `autoGrant` the host returns window credit as soon as bytes arrive
 * (collect mode), otherwise the consumer calls `consumed()` (streaming mode, backpressure
 * reaches the guest process).
 */
export class ExecStream extends StreamOp {
  pid: number | undefined;
  private exitInfo: ExitInfo | undefined;
  private error: Error | undefined;
  private readonly done: Promise<ExitInfo>;
  private resolveDone!: (e: ExitInfo) => void;
  private rejectDone!: (e: Error) => void;
  private readonly recvWindow = [0, INITIAL_WINDOW, INITIAL_WINDOW];
  private readonly stdinWindow = new SendWindow();
  private stdinClosed = false;
  onStdout: (chunk: Buffer) => void = () => {};
  onStderr: (chunk: Buffer) => void = () => {};
  onOutputEnd: (channel: 1 | 2) => void = () => {};

  constructor(
    client: AgentClient,
    id: number,
    private readonly autoGrant: boolean,
  ) {
    super(client, id);
    this.done = new Promise((res, rej) => {
      this.resolveDone = res;
      this.rejectDone = rej;
    });
    this.done.catch(() => {});
  }

  wait(): Promise<ExitInfo> {
    return this.done;
  }

  get exit(): ExitInfo | undefined {
    return this.exitInfo;
  }

  onFrame(frame: Frame): void {
    switch (frame.type) {
      case Msg.STARTED:
        this.pid = new Fields(frame.payload, "STARTED").u32(Tag.started.pid);
        return;
      case Msg.DATA: {
        const ch = frame.flags & CHANNEL_MASK;
        if (ch !== Channel.STDOUT && ch !== Channel.STDERR) {
          throw new AgentError("AGENT_PROTOCOL", `DATA on channel ${ch} from the agent`);
        }
        const len = frame.payload.length;
        if (len > this.recvWindow[ch]!) {
          throw new AgentError(
            "AGENT_PROTOCOL",
            `agent sent ${len} bytes on stream ${this.id} channel ${ch} with ${this.recvWindow[ch]} bytes of window`,
          );
        }
        this.recvWindow[ch]! -= len;
        if (len > 0) {
          if (ch === Channel.STDOUT) this.onStdout(frame.payload);
          else this.onStderr(frame.payload);
          if (this.autoGrant) this.consumed(ch, len);
        }
        if (frame.flags & FLAG_EOF) this.onOutputEnd(ch);
        return;
      }
      case Msg.WINDOW: {
        if ((frame.flags & CHANNEL_MASK) === Channel.STDIN && frame.payload.length === 4) {
          this.stdinWindow.grant(frame.payload.readUInt32LE(0));
        }
        return;
      }
      case Msg.EXIT: {
        const f = new Fields(frame.payload, "EXIT");
        const rss = f.u64(Tag.exit.peakRssKib);
        this.exitInfo = {
          exitCode: f.i32(Tag.exit.exitCode) ?? -1,
          signal: f.u32(Tag.exit.signal) ?? 0,
          timedOut: (f.u8(Tag.exit.timedOut) ?? 0) === 1,
          peakRssKib: rss === undefined ? null : Number(rss),
          durationUs: Number(f.u64(Tag.exit.durationUs) ?? 0n),
        };
        this.end();
        this.stdinWindow.wake();
        this.resolveDone(this.exitInfo);
        return;
      }
      case Msg.STREAM_ERROR: {
        this.fail(this.streamError(frame, "exec failed"));
        this.end();
        return;
      }
      default:
        log("exec stream %d: ignoring frame type %d", this.id, frame.type);
    }
  }

  /** Return `n` bytes of credit on an output channel (streaming consumers call this). */
  consumed(channel: number, n: number): void {
    if (this.ended || n <= 0) return;
    this.recvWindow[channel]! += n;
    this.client.send(Msg.WINDOW, this.id, windowPayload(n), channel);
  }

  async write(data: Buffer): Promise<void> {
    if (this.stdinClosed) throw new AgentError("AGENT_STDIN_CLOSED", "stdin of this process is already closed");
    let off = 0;
    while (off < data.length) {
      const n = await this.stdinWindow.acquire(Math.min(DATA_CHUNK, data.length - off), () =>
        this.ended ? (this.error ?? new AgentError("AGENT_PROCESS_EXITED", "the process has exited")) : undefined,
      );
      if (this.ended) throw this.error ?? new AgentError("AGENT_PROCESS_EXITED", "the process has exited");
      this.client.send(Msg.DATA, this.id, data.subarray(off, off + n), Channel.STDIN);
      off += n;
    }
  }

  closeStdin(): void {
    if (this.stdinClosed || this.ended) return;
    this.stdinClosed = true;
    this.client.send(Msg.DATA, this.id, undefined, Channel.STDIN | FLAG_EOF);
  }

  signal(signum: number, group = false): void {
    if (this.ended) return;
    const p = new FieldWriter().u32(Tag.signal.signum, signum).u8(Tag.signal.group, group ? 1 : 0).finish();
    this.client.send(Msg.SIGNAL, this.id, p);
  }

  cancel(): void {
    if (!this.ended) this.client.send(Msg.CANCEL, this.id);
  }

  fail(err: Error): void {
    if (this.exitInfo || this.error) return;
    this.error = err;
    this.ended = true;
    this.stdinWindow.wake();
    this.rejectDone(err);
  }
}

/** A request that ends with OK (file transfers, bench). */
class RequestOp extends StreamOp {
  readonly result: Promise<Fields>;
  private resolve!: (f: Fields) => void;
  private reject!: (e: Error) => void;
  readonly sendWindow = new SendWindow();
  private recvCredit = INITIAL_WINDOW;
  private receivedBytes = 0;
  readonly chunks: Buffer[] = [];

  constructor(
    client: AgentClient,
    id: number,
    private readonly what: string,
    private readonly maxBytes = Infinity,
  ) {
    super(client, id);
    this.result = new Promise((res, rej) => {
      this.resolve = res;
      this.reject = rej;
    });
    this.result.catch(() => {});
  }

  onFrame(frame: Frame): void {
    switch (frame.type) {
      case Msg.OK:
        this.end();
        this.sendWindow.wake();
        this.resolve(new Fields(frame.payload, "OK"));
        return;
      case Msg.STREAM_ERROR:
        this.end();
        this.fail(this.streamError(frame, this.what));
        return;
      case Msg.WINDOW:
        if ((frame.flags & CHANNEL_MASK) === Channel.STDIN && frame.payload.length === 4) {
          this.sendWindow.grant(frame.payload.readUInt32LE(0));
        }
        return;
      case Msg.DATA: {
        const len = frame.payload.length;
        if ((frame.flags & CHANNEL_MASK) !== Channel.STDOUT || len > this.recvCredit) {
          throw new AgentError("AGENT_PROTOCOL", `${this.what}: agent sent data beyond its window`);
        }
        this.receivedBytes += len;
        if (this.receivedBytes > this.maxBytes) {
          this.client.send(Msg.CANCEL, this.id);
          this.end();
          this.fail(new AgentError("AGENT_TOO_LARGE", `${this.what}: more than ${this.maxBytes} bytes`));
          return;
        }
        if (len) {
          this.chunks.push(frame.payload);
          // Consumed at once: hand the credit straight back.
          this.client.send(Msg.WINDOW, this.id, windowPayload(len), Channel.STDOUT);
        }
        return;
      }
      default:
        log("%s: ignoring frame type %d", this.what, frame.type);
    }
  }

  fail(err: Error): void {
    this.ended = true;
    this.sendWindow.wake();
    this.reject(err);
  }
}

export interface AgentClientOptions {
  /** Called once when the connection fails for good (protocol violation, channel closed). */
  onFatal?: (err: Error) => void;
}

/**
 * The host end of one agent connection. Create it on a connected duplex (the QEMU chardev
 * socket), then call `hello()` before anything else.
 */
export class AgentClient extends EventEmitter {
  private readonly decoder = new FrameDecoder();
  private readonly streams = new Map<number, StreamOp>();
  private readonly pings = new Map<number, (payload: Buffer) => void>();
  private nextId = 1;
  private fatal: Error | undefined;
  private helloWaiter: { resolve: (h: HelloInfo) => void; reject: (e: Error) => void } | undefined;

  constructor(
    private readonly channel: Duplex,
    private readonly options: AgentClientOptions = {},
  ) {
    super();
    channel.on("data", (chunk: Buffer) => this.onData(chunk));
    channel.on("error", (err) => this.die(new AgentError("AGENT_CHANNEL", `agent channel error: ${err.message}`, { cause: err })));
    channel.on("close", () => this.die(new AgentError("AGENT_CHANNEL_CLOSED", "the agent channel closed (the VM stopped?)")));
  }

  get dead(): Error | undefined {
    return this.fatal;
  }

  private onData(chunk: Buffer): void {
    if (this.fatal) return;
    try {
      for (const frame of this.decoder.push(chunk)) this.dispatch(frame);
    } catch (err) {
      this.die(err instanceof AgentError ? err : new AgentError("AGENT_PROTOCOL", String(err), { cause: err }));
    }
  }

  private dispatch(frame: Frame): void {
    switch (frame.type) {
      case Msg.HELLO_OK: {
        const f = new Fields(frame.payload, "HELLO_OK");
        const info: HelloInfo = {
          version: f.u16(Tag.helloOk.version) ?? 0,
          agentVersion: f.string(Tag.helloOk.agentVersion) ?? "unknown",
          uptimeMs: Number(f.u64(Tag.helloOk.uptimeMs) ?? 0n),
          features: (f.string(Tag.helloOk.features) ?? "").split(",").filter(Boolean),
        };
        const w = this.helloWaiter;
        this.helloWaiter = undefined;
        this.updateRef();
        if (info.version !== PROTOCOL_VERSION) {
          throw new AgentError("AGENT_VERSION", `agent chose protocol version ${info.version}, host speaks ${PROTOCOL_VERSION}`);
        }
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
      default: {
        const op = this.streams.get(frame.stream);
        if (op) op.onFrame(frame);
        else log("frame type %d for unknown stream %d dropped", frame.type, frame.stream);
      }
    }
  }

  private die(err: Error): void {
    if (this.fatal) return;
    this.fatal = err;
    log("connection failed: %s", err.message);
    this.helloWaiter?.reject(err);
    this.helloWaiter = undefined;
    for (const op of this.streams.values()) op.fail(err);
    this.streams.clear();
    this.pings.clear();
    this.options.onFatal?.(err);
    this.emit("fatal", err);
  }

  /** Fail the connection from the outside (the VM died, the owner is closing). */
  close(err: Error = new AgentError("AGENT_CLOSED", "the agent connection was closed")): void {
    this.die(err);
    this.channel.destroy();
  }

  /** @internal */
  send(type: number, stream: number, payload?: Buffer, flags = 0): void {
    if (this.fatal) throw this.fatal;
    this.channel.write(encodeFrame(type, stream, payload, flags));
  }

  /** @internal */
  forget(id: number): void {
    this.streams.delete(id);
    this.updateRef();
  }

  /**
   * The channel keeps Node's event loop alive only while an operation is in flight, so an idle
   * VM never stops a program from exiting (its QEMU process is then killed by the exit hook).
   */
  private updateRef(): void {
    const busy = this.streams.size + this.pings.size + (this.helloWaiter ? 1 : 0) > 0;
    if (busy === this.refd) return;
    this.refd = busy;
    const ch = this.channel as Duplex & { ref?: () => void; unref?: () => void };
    if (busy) ch.ref?.();
    else ch.unref?.();
  }
  private refd = true;

  /** Re-evaluates whether the channel keeps the event loop alive (idle: it does not). */
  settle(): void {
    this.updateRef();
  }

  private allocId(): number {
    for (;;) {
      const id = this.nextId;
      this.nextId = this.nextId >= 0xffffffff ? 1 : this.nextId + 1;
      if (!this.streams.has(id) && !this.pings.has(id)) return id;
    }
  }

  private checkAlive(): void {
    if (this.fatal) throw this.fatal;
  }

  hello(opts: { entropy?: Buffer; timeoutMs?: number } = {}): Promise<HelloInfo> {
    this.checkAlive();
    const w = new FieldWriter()
      .u16(Tag.hello.versionMin, PROTOCOL_VERSION)
      .u16(Tag.hello.versionMax, PROTOCOL_VERSION)
      .u64(Tag.hello.hostTimeNs, BigInt(Date.now()) * 1_000_000n);
    if (opts.entropy) w.bytes(Tag.hello.entropy, opts.entropy);
    return new Promise<HelloInfo>((resolve, reject) => {
      const timer =
        opts.timeoutMs === undefined
          ? undefined
          : setTimeout(() => {
              this.helloWaiter = undefined;
              this.updateRef();
              reject(new AgentError("AGENT_HELLO_TIMEOUT", `the agent did not answer HELLO within ${opts.timeoutMs} ms`));
            }, opts.timeoutMs);
      this.helloWaiter = {
        resolve: (h) => {
          clearTimeout(timer);
          resolve(h);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      this.updateRef();
      this.send(Msg.HELLO, 0, w.finish());
    });
  }

  /** One protocol round trip that starts no process. Resolves with the elapsed milliseconds. */
  ping(payload: Buffer = Buffer.alloc(0)): Promise<number> {
    this.checkAlive();
    if (payload.length > MAX_PING_PAYLOAD) throw new AgentError("AGENT_PING_TOO_LARGE", `ping payload over ${MAX_PING_PAYLOAD} bytes`);
    const id = this.allocId();
    const t0 = performance.now();
    return new Promise<number>((resolve, reject) => {
      const onFatal = (e: Error) => reject(e);
      this.once("fatal", onFatal);
      this.pings.set(id, (echo) => {
        this.off("fatal", onFatal);
        this.updateRef();
        if (!echo.equals(payload)) reject(new AgentError("AGENT_PROTOCOL", "PONG payload differs from PING"));
        else resolve(performance.now() - t0);
      });
      this.updateRef();
      this.send(Msg.PING, id, payload);
    });
  }

  exec(req: ExecRequest, opts: { autoGrant?: boolean } = {}): ExecStream {
    this.checkAlive();
    const id = this.allocId();
    const op = new ExecStream(this, id, opts.autoGrant ?? true);
    const w = new FieldWriter();
    for (const a of req.argv) w.bytes(Tag.exec.argv, a);
    for (const e of req.env) w.bytes(Tag.exec.env, e);
    if (req.cwd !== undefined) w.bytes(Tag.exec.cwd, req.cwd);
    if (req.timeoutMs) w.u64(Tag.exec.timeoutMs, Math.ceil(req.timeoutMs));
    if (req.uid !== undefined) w.u32(Tag.exec.uid, req.uid);
    if (req.gid !== undefined) w.u32(Tag.exec.gid, req.gid);
    if (req.stdin) w.u8(Tag.exec.stdin, 1);
    this.streams.set(id, op);
    this.updateRef();
    this.send(Msg.EXEC, id, w.finish());
    return op;
  }

  async writeFile(path: string, data: Buffer, opts: { mode?: number; uid?: number; gid?: number } = {}): Promise<void> {
    this.checkAlive();
    const id = this.allocId();
    const op = new RequestOp(this, id, `write ${path}`);
    const w = new FieldWriter()
      .bytes(Tag.writeFile.path, path)
      .u32(Tag.writeFile.mode, opts.mode ?? 0o644)
      .u64(Tag.writeFile.size, data.length);
    if (opts.uid !== undefined) w.u32(Tag.writeFile.uid, opts.uid);
    if (opts.gid !== undefined) w.u32(Tag.writeFile.gid, opts.gid);
    this.streams.set(id, op);
    this.updateRef();
    this.send(Msg.WRITE_FILE, id, w.finish());
    let off = 0;
    while (off < data.length && !op.ended) {
      const n = await op.sendWindow.acquire(Math.min(DATA_CHUNK, data.length - off), () => this.fatal);
      if (op.ended) break;
      this.send(Msg.DATA, id, data.subarray(off, off + n), Channel.STDIN);
      off += n;
    }
    if (!op.ended) this.send(Msg.DATA, id, undefined, Channel.STDIN | FLAG_EOF);
    await op.result;
  }

  async readFile(path: string, maxSize = 0): Promise<Buffer> {
    this.checkAlive();
    const id = this.allocId();
    const op = new RequestOp(this, id, `read ${path}`, maxSize || Infinity);
    const w = new FieldWriter().bytes(Tag.readFile.path, path).u64(Tag.readFile.maxSize, maxSize);
    this.streams.set(id, op);
    this.updateRef();
    this.send(Msg.READ_FILE, id, w.finish());
    await op.result;
    return Buffer.concat(op.chunks);
  }

  /** Ask the agent to time `count` spawn+reap cycles of `argv` itself (guest clock). */
  async spawnBench(argv: string[], count: number, env: string[] = []): Promise<number[]> {
    this.checkAlive();
    const id = this.allocId();
    const op = new RequestOp(this, id, `spawn bench ${argv.join(" ")}`);
    const w = new FieldWriter();
    for (const a of argv) w.bytes(Tag.spawnBench.argv, a);
    w.u32(Tag.spawnBench.count, count);
    for (const e of env) w.bytes(Tag.spawnBench.env, e);
    this.streams.set(id, op);
    this.updateRef();
    this.send(Msg.SPAWN_BENCH, id, w.finish());
    const f = await op.result;
    return f.u64Array(Tag.ok.samplesNs).map((ns) => Number(ns) / 1e6);
  }

  /** Starts the image's workload (PROTOCOL.md: WORKLOAD_START). Resolves with its guest pid. */
  async startWorkload(req: Omit<ExecRequest, "stdin" | "timeoutMs">): Promise<number> {
    this.checkAlive();
    const id = this.allocId();
    const op = new RequestOp(this, id, `start workload ${req.argv[0] ?? ""}`);
    const w = new FieldWriter();
    for (const a of req.argv) w.bytes(Tag.exec.argv, a);
    for (const e of req.env) w.bytes(Tag.exec.env, e);
    if (req.cwd !== undefined) w.bytes(Tag.exec.cwd, req.cwd);
    if (req.uid !== undefined) w.u32(Tag.exec.uid, req.uid);
    if (req.gid !== undefined) w.u32(Tag.exec.gid, req.gid);
    this.streams.set(id, op);
    this.updateRef();
    this.send(Msg.WORKLOAD_START, id, w.finish());
    return (await op.result).u32(Tag.ok.pid) ?? -1;
  }

  /** Sends `signum` to the workload's process group. */
  async signalWorkload(signum: number): Promise<void> {
    this.checkAlive();
    const id = this.allocId();
    const op = new RequestOp(this, id, `signal ${signum} to the workload`);
    this.streams.set(id, op);
    this.updateRef();
    this.send(Msg.WORKLOAD_SIGNAL, id, new FieldWriter().u32(Tag.signal.signum, signum).finish());
    await op.result;
  }

  /** Ask the guest to power off. The caller waits for the hypervisor to exit. */
  shutdown(): void {
    if (!this.fatal) this.send(Msg.SHUTDOWN, 0);
  }
}
