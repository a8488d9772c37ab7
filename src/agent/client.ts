/**
 * A connection to one guest agent: multiplexes exec, file, TCP and ping operations over the
 * virtio-serial byte stream, with per-channel flow control (PROTOCOL.md section 3).
 *
 * The guest is untrusted: every frame it sends is validated, and any violation (oversized or
 * garbled frame, data beyond the granted window) fails the whole connection; the VM that owns
 * it is then torn down by its owner.
 *
 * Flow control is end to end: an operation returns window credit only as its consumer takes
 * the bytes (`consumed`), so a guest writing faster than the host reads is paused in the guest,
 * and host memory per channel stays within one window (256 KiB).
 */
import { EventEmitter } from "node:events";
import type { Duplex } from "node:stream";
import { AgentError } from "../errors.js";
import { logger } from "../debug.js";
import {
  AGENT_STREAM_BASE,
  Channel,
  CHANNEL_MASK,
  DATA_CHUNK,
  encodeFrame,
  FieldWriter,
  Fields,
  FLAG_EOF,
  type Frame,
  FrameDecoder,
  FrameError,
  INITIAL_WINDOW,
  MAX_PING_PAYLOAD,
  Msg,
  PROTOCOL_VERSION,
  StreamErrorCode,
  Tag,
  windowPayload,
} from "./protocol.js";

const log = logger("agent");

/** A promise with its settle functions; settles once, and never counts as unhandled. */
class Deferred<T> {
  readonly promise: Promise<T>;
  resolve!: (v: T) => void;
  reject!: (e: Error) => void;
  constructor() {
    this.promise = new Promise<T>((res, rej) => {
      this.resolve = res;
      this.reject = rej;
    });
    this.promise.catch(() => {});
  }
}

export interface HelloInfo {
  version: number;
  agentVersion: string;
  uptimeMs: number;
  features: string[];
  /** Name of the virtio port this connection runs on. */
  port: string | undefined;
  /** The VM id the guest has taken (HELLO `vmId` on the primary port of a VM). */
  vmId: string | undefined;
  /** The default limits of an exec's cgroup, when execs run in cgroups (feature `limits`). */
  limits: { pidsMax: number; memoryMaxBytes: number } | undefined;
}

/** Processes an exec left running after its main process ended (LIST_BACKGROUND). */
export interface BackgroundEntry {
  /** The exec's id (its cgroup, /sys/fs/cgroup/exec/<id>). */
  id: number;
  argv: string[];
  /** Guest pids of its processes. */
  pids: number[];
  /** Started with `detach`: a release leaves them running. */
  detached: boolean;
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
  /** Run on a pseudo-terminal of this size. */
  tty?: { cols: number; rows: number };
  /** Run after argv exits 0, in the same stream. */
  chain?: string[];
  /** pids.max / memory.max of the exec's cgroup (absent: the agent's defaults). */
  limits?: { pidsMax?: number | undefined; memoryMaxBytes?: number | undefined };
  /** Processes it leaves running survive a kill of the attached leftovers (release). */
  detach?: boolean;
}

export interface ExitInfo {
  exitCode: number;
  /** Terminating signal number, 0 if none. */
  signal: number;
  timedOut: boolean;
  peakRssKib: number | null;
  durationUs: number;
  /** 0: the first command; 1: the chained one. */
  step: number;
  /** The OOM killer took the exec: its memory limit was reached. */
  oomKilled: boolean;
  /** A fork in the exec failed at its process limit. */
  pidsLimited: boolean;
}

/**
 * An error the agent reported for one stream (STREAM_ERROR): `agentCode` is the protocol's
 * name (`NOT_FOUND`, `REFUSED`, ...), `errno` the guest errno behind it when there was one.
 */
export class AgentStreamError extends AgentError {
  constructor(
    readonly agentCode: string,
    message: string,
    readonly errno: number | undefined,
  ) {
    super(`AGENT_${agentCode}`, message);
  }
}

/** Base for operations that own a stream id until the agent ends it. */
abstract class StreamOp {
  ended = false;
  constructor(
    protected readonly client: AgentClient,
    readonly id: number,
  ) {}
  abstract onFrame(frame: Frame): void;
  /** Ends the operation with `err` (connection failure, abandon). */
  abstract fail(err: Error): void;
  protected end(): void {
    this.ended = true;
    this.client.forget(this.id);
  }
  protected streamError(frame: Frame, what: string): AgentStreamError {
    const f = new Fields(frame.payload, "STREAM_ERROR");
    const code = f.u32(Tag.streamError.code) ?? 0;
    const name = StreamErrorCode[code] ?? `CODE_${code}`;
    const message = f.string(Tag.streamError.message) ?? "";
    return new AgentStreamError(name, `${what}: ${message || name}`, f.u32(Tag.streamError.errno));
  }
  /**
   * Gives up on the operation without waiting for the agent: sends CANCEL, fails with `err`
   * and forgets the id (a late answer is dropped). For deadlines and aborts, when the guest may
   * not answer at all.
   */
  abandon(err: Error): void {
    if (this.ended) return;
    this.client.trySend(Msg.CANCEL, this.id);
    this.fail(err);
    this.end();
  }
  /** Checks and accounts a DATA frame from the agent against our receive windows. */
  protected checkData(frame: Frame, windows: Array<RecvWindow | undefined>, what: string): number {
    const ch = frame.flags & CHANNEL_MASK;
    const w = windows[ch];
    if (!w) throw new AgentError("AGENT_PROTOCOL", `${what}: DATA on channel ${ch} from the agent`);
    w.take(frame.payload.length, ch);
    return ch;
  }
  /** Returns consumed credit on channel `ch` (batched, see RecvWindow). */
  protected credit(windows: Array<RecvWindow | undefined>, ch: number, n: number): void {
    if (this.ended || n <= 0) return;
    const give = windows[ch]!.consume(n);
    if (give > 0) this.client.send(Msg.WINDOW, this.id, windowPayload(give), ch);
  }
}

/**
 * Receive side of one channel: the window the peer may still fill, and credit consumed but not
 * yet returned. Credit goes back in lumps of at least a quarter window, so interactive traffic
 * (many small messages) does not cost a WINDOW frame, and a guest wake-up, per message; the
 * peer never runs dry, since what is held back is under a quarter of the window.
 */
class RecvWindow {
  private window = INITIAL_WINDOW;
  private owed = 0;
  constructor(
    private readonly what: string,
    private readonly id: number,
  ) {}
  /** Accounts `len` received bytes; a frame beyond the window is a protocol violation. */
  take(len: number, ch: number): void {
    if (len > this.window) {
      throw new AgentError("AGENT_PROTOCOL", `${this.what}: agent sent ${len} bytes on stream ${this.id} channel ${ch} with ${this.window} bytes of window`);
    }
    this.window -= len;
  }
  /** Marks `n` bytes consumed; returns the credit to send now (0: keep it for later). */
  consume(n: number): number {
    this.owed += n;
    if (this.owed < CREDIT_LUMP) return 0;
    const give = this.owed;
    this.owed = 0;
    this.window += give;
    return give;
  }
}
const CREDIT_LUMP = INITIAL_WINDOW / 4;

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
  /** Resolves when at least one byte may be sent; returns how many (at most `want`). */
  async acquire(want: number, isDead: () => Error | undefined): Promise<number> {
    for (;;) {
      const dead = isDead();
      if (dead) throw dead;
      if (this.credit > 0) break;
      await new Promise<void>((r) => this.waiters.push(r));
    }
    const n = Math.min(want, this.credit);
    this.credit -= n;
    return n;
  }
  /** Takes `n` bytes of credit if that much is there (the fast path: no await). */
  tryTake(n: number): boolean {
    if (this.credit < n) return false;
    this.credit -= n;
    return true;
  }
  wake(): void {
    this.grant(0);
  }
}

/** Sends `data` on channel 0 of `op` within its window, in DATA_CHUNK pieces. */
async function sendWindowed(client: AgentClient, id: number, win: SendWindow, data: Buffer, isDead: () => Error | undefined): Promise<void> {
  let off = 0;
  while (off < data.length) {
    const n = await win.acquire(Math.min(DATA_CHUNK, data.length - off), isDead);
    const dead = isDead();
    if (dead) throw dead;
    client.send(Msg.DATA, id, data.subarray(off, off + n), Channel.STDIN);
    off += n;
  }
}

/**
 * A running process in the guest. Output is delivered through `onStdout`/`onStderr`; with
 * `autoGrant` the host returns window credit as soon as bytes arrive (collect mode), otherwise
 * the consumer calls `consumed()` (streaming mode: backpressure reaches the guest process).
 */
export class ExecStream extends StreamOp {
  pid: number | undefined;
  /** The exec's id in the guest (its cgroup), when it runs in one. */
  execId: number | undefined;
  private exitInfo: ExitInfo | undefined;
  private error: Error | undefined;
  private readonly done = new Deferred<ExitInfo>();
  private readonly start = new Deferred<void>();
  private readonly recvWindow: Array<RecvWindow | undefined>;
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
    this.recvWindow = [undefined, new RecvWindow("exec", id), new RecvWindow("exec", id)];
  }

  /** Resolves once the process runs (STARTED) or ended without starting (EXIT); rejects on error. */
  get started(): Promise<void> {
    return this.start.promise;
  }

  wait(): Promise<ExitInfo> {
    return this.done.promise;
  }

  get exit(): ExitInfo | undefined {
    return this.exitInfo;
  }

  /** The error that ended the stream, if any. */
  get failure(): Error | undefined {
    return this.error;
  }

  onFrame(frame: Frame): void {
    switch (frame.type) {
      case Msg.STARTED: {
        const f = new Fields(frame.payload, "STARTED");
        this.pid = f.u32(Tag.started.pid);
        this.execId = f.u32(Tag.started.execId);
        this.start.resolve();
        return;
      }
      case Msg.DATA: {
        const ch = this.checkData(frame, this.recvWindow, `exec stream ${this.id}`);
        const len = frame.payload.length;
        if (len > 0) {
          if (ch === Channel.STDOUT) this.onStdout(frame.payload);
          else this.onStderr(frame.payload);
          if (this.autoGrant) this.consumed(ch, len);
        }
        if (frame.flags & FLAG_EOF) this.onOutputEnd(ch as 1 | 2);
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
          step: f.u8(Tag.exit.step) ?? 0,
          oomKilled: (f.u8(Tag.exit.oomKilled) ?? 0) === 1,
          pidsLimited: (f.u8(Tag.exit.pidsLimited) ?? 0) === 1,
        };
        this.end();
        this.stdinWindow.wake();
        this.start.resolve();
        this.done.resolve(this.exitInfo);
        return;
      }
      case Msg.STREAM_ERROR: {
        const err = this.streamError(frame, "exec failed");
        this.end();
        this.fail(err);
        return;
      }
      default:
        log("exec stream %d: ignoring frame type %d", this.id, frame.type);
    }
  }

  /** Return `n` bytes of credit on an output channel (streaming consumers call this). */
  consumed(channel: number, n: number): void {
    this.credit(this.recvWindow, channel, n);
  }

  private gone = (): Error | undefined =>
    this.ended ? (this.error ?? new AgentError("AGENT_PROCESS_EXITED", "the process has exited")) : undefined;

  async write(data: Buffer): Promise<void> {
    if (this.stdinClosed) throw new AgentError("AGENT_STDIN_CLOSED", "stdin of this process is already closed");
    await sendWindowed(this.client, this.id, this.stdinWindow, data, this.gone);
  }

  get stdinIsClosed(): boolean {
    return this.stdinClosed;
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

  resize(cols: number, rows: number): void {
    if (this.ended) return;
    this.client.send(Msg.RESIZE, this.id, new FieldWriter().u16(Tag.resize.cols, cols).u16(Tag.resize.rows, rows).finish());
  }

  cancel(): void {
    if (!this.ended) this.client.send(Msg.CANCEL, this.id);
  }

  fail(err: Error): void {
    if (this.exitInfo || this.error) return;
    this.error = err;
    this.ended = true;
    this.stdinWindow.wake();
    this.start.reject(err);
    this.done.reject(err);
  }
}

/**
 * A TCP connection from the guest to one of its own ports (TCP_CONNECT). `connected` settles
 * when the guest connected or refused; bytes from the guest arrive through `onData` (credit is
 * returned with `consumed`), `write`/`end` send towards the guest, `done` settles when both
 * directions have ended (OK) or the stream failed.
 */
export class TcpStream extends StreamOp {
  private readonly connect = new Deferred<void>();
  private readonly finish = new Deferred<void>();
  private readonly recvWindow: Array<RecvWindow | undefined>;
  private readonly sendWin = new SendWindow();
  private error: Error | undefined;
  private sentEof = false;
  onData: (chunk: Buffer) => void = () => {};
  onEnd: () => void = () => {};
  onStarted: () => void = () => {};

  /** `accepted`: a PROXY_CONN stream, opened by the agent on a connection it accepted (no STARTED). */
  constructor(client: AgentClient, id: number, accepted = false) {
    super(client, id);
    this.recvWindow = [undefined, new RecvWindow("tcp", id)];
    if (accepted) this.connect.resolve();
  }

  /** Settles when the guest connected (STARTED) or could not (REFUSED, IO). */
  get connected(): Promise<void> {
    return this.connect.promise;
  }

  /** Settles when both directions have ended (OK) or the stream failed. */
  get done(): Promise<void> {
    return this.finish.promise;
  }

  onFrame(frame: Frame): void {
    switch (frame.type) {
      case Msg.STARTED:
        // Synchronously, before any DATA of this stream is dispatched.
        this.onStarted();
        this.connect.resolve();
        return;
      case Msg.DATA: {
        this.checkData(frame, this.recvWindow, `tcp stream ${this.id}`);
        if (frame.payload.length) this.onData(frame.payload);
        if (frame.flags & FLAG_EOF) this.onEnd();
        return;
      }
      case Msg.WINDOW:
        if ((frame.flags & CHANNEL_MASK) === Channel.STDIN && frame.payload.length === 4) this.sendWin.grant(frame.payload.readUInt32LE(0));
        return;
      case Msg.OK:
        this.end();
        this.sendWin.wake();
        this.connect.resolve();
        this.finish.resolve();
        return;
      case Msg.STREAM_ERROR: {
        const err = this.streamError(frame, "guest connection");
        this.end();
        this.fail(err);
        return;
      }
      default:
        log("tcp stream %d: ignoring frame type %d", this.id, frame.type);
    }
  }

  consumed(n: number): void {
    this.credit(this.recvWindow, Channel.STDOUT, n);
  }

  private gone = (): Error | undefined =>
    this.ended ? (this.error ?? new AgentError("AGENT_STREAM_ENDED", "the guest connection has ended")) : undefined;

  /**
   * Sends `data` at once if the window has room for all of it; false (nothing sent) otherwise,
   * and the caller awaits `write`.
   */
  tryWrite(data: Buffer): boolean {
    if (this.ended || this.sentEof || !this.sendWin.tryTake(data.length)) return false;
    for (let off = 0; off < data.length; off += DATA_CHUNK) {
      this.client.send(Msg.DATA, this.id, data.subarray(off, off + DATA_CHUNK), Channel.STDIN);
    }
    return true;
  }

  /** Sends bytes to the guest; resolves when they are within the window (sent). */
  async write(data: Buffer): Promise<void> {
    if (this.sentEof) throw new AgentError("AGENT_STREAM_ENDED", "write after end");
    await sendWindowed(this.client, this.id, this.sendWin, data, this.gone);
  }

  /** Half-close towards the guest (its socket's receiving side sees EOF). */
  closeWrite(): void {
    if (this.ended || this.sentEof) return;
    this.sentEof = true;
    this.client.send(Msg.DATA, this.id, undefined, Channel.STDIN | FLAG_EOF);
  }

  cancel(): void {
    if (!this.ended) this.client.send(Msg.CANCEL, this.id);
  }

  fail(err: Error): void {
    if (this.error) return;
    this.error = err;
    this.ended = true;
    this.sendWin.wake();
    this.connect.reject(err);
    this.finish.reject(err);
  }
}

/**
 * A file transfer or a request that ends with OK (WRITE_FILE, READ_FILE, SPAWN_BENCH,
 * WORKLOAD_*). For READ_FILE the content arrives through `onData`; credit goes back at once
 * (`autoGrant`, buffered reads) or as the consumer calls `consumed` (streams).
 */
class RequestOp extends StreamOp {
  private readonly outcome = new Deferred<Fields>();
  readonly sendWindow = new SendWindow();
  private readonly recvWindow: Array<RecvWindow | undefined>;
  private receivedBytes = 0;
  private error: Error | undefined;
  onData: (chunk: Buffer) => void = () => {};

  constructor(
    client: AgentClient,
    id: number,
    readonly what: string,
    private readonly maxBytes = Infinity,
    private readonly autoGrant = true,
  ) {
    super(client, id);
    this.recvWindow = [undefined, new RecvWindow(what, id)];
  }

  /** The OK's fields; rejects with the STREAM_ERROR (or the connection's failure). */
  get result(): Promise<Fields> {
    return this.outcome.promise;
  }

  onFrame(frame: Frame): void {
    switch (frame.type) {
      case Msg.OK: {
        const fields = new Fields(frame.payload, "OK");
        this.end();
        this.sendWindow.wake();
        this.outcome.resolve(fields);
        return;
      }
      case Msg.STREAM_ERROR: {
        const err = this.streamError(frame, this.what);
        this.end();
        this.fail(err);
        return;
      }
      case Msg.WINDOW:
        if ((frame.flags & CHANNEL_MASK) === Channel.STDIN && frame.payload.length === 4) {
          this.sendWindow.grant(frame.payload.readUInt32LE(0));
        }
        return;
      case Msg.DATA: {
        this.checkData(frame, this.recvWindow, this.what);
        const len = frame.payload.length;
        this.receivedBytes += len;
        if (this.receivedBytes > this.maxBytes) {
          this.abandon(new AgentError("AGENT_TOO_LARGE", `${this.what}: more than ${this.maxBytes} bytes`));
          return;
        }
        if (len) {
          this.onData(frame.payload);
          if (this.autoGrant) this.consumed(len);
        }
        return;
      }
      default:
        log("%s: ignoring frame type %d", this.what, frame.type);
    }
  }

  consumed(n: number): void {
    this.credit(this.recvWindow, Channel.STDOUT, n);
  }

  gone = (): Error | undefined => (this.ended ? (this.error ?? new AgentError("AGENT_STREAM_ENDED", `${this.what}: the request has ended`)) : undefined);

  fail(err: Error): void {
    if (this.error) return;
    this.error = err;
    this.ended = true;
    this.sendWindow.wake();
    this.outcome.reject(err);
  }
}

export type { RequestOp };

/** A READ_FILE in progress, for streaming consumers (credit returned as they consume). */
export interface FileReader {
  readonly id: number;
  onData: (chunk: Buffer) => void;
  consumed(n: number): void;
  /** Resolves with the file size once the whole file was sent; rejects on error. */
  readonly done: Promise<number>;
  abandon(err: Error): void;
}

/** A WRITE_FILE in progress, fed by `write` and finished by `finish`. */
export interface FileWriter {
  readonly id: number;
  write(chunk: Buffer): Promise<void>;
  /** Sends EOF and resolves with the size the agent wrote. */
  finish(): Promise<number>;
  abandon(err: Error): void;
}

/** Takes a connection the guest made to the agent's proxy listener. */
export type ProxyConnHandler = (stream: TcpStream, info: { peerPort: number }) => void;

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
  /** Who takes PROXY_CONN streams while the agent's proxy listener is up (proxyListen). */
  private proxyHandler: ProxyConnHandler | undefined;
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

  /** Streams in flight (diagnostics, tests). */
  get openStreams(): number {
    return this.streams.size;
  }

  private onData(chunk: Buffer): void {
    if (this.fatal) return;
    try {
      let frames: Frame[];
      try {
        frames = this.decoder.push(chunk);
      } catch (err) {
        // The frames before a bad header count, as they would had they come in another read.
        if (err instanceof FrameError) for (const frame of err.before) this.dispatch(frame);
        throw err;
      }
      for (const frame of frames) this.dispatch(frame);
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
          port: f.string(Tag.helloOk.port),
          vmId: f.string(Tag.helloOk.vmId),
          limits: undefined,
        };
        const pidsMax = f.u32(Tag.helloOk.defaultPidsMax);
        const memoryMax = f.u64(Tag.helloOk.defaultMemoryMax);
        if (pidsMax !== undefined && memoryMax !== undefined) info.limits = { pidsMax, memoryMaxBytes: Number(memoryMax) };
        // A wrong version fails the connection, and with it the HELLO waiting for this answer.
        if (info.version !== PROTOCOL_VERSION) {
          throw new AgentError("AGENT_VERSION", `agent chose protocol version ${info.version}, host speaks ${PROTOCOL_VERSION}`);
        }
        const w = this.helloWaiter;
        this.helloWaiter = undefined;
        this.updateRef();
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
    const peerPort = new Fields(frame.payload, "PROXY_CONN").u16(Tag.proxyConn.peerPort) ?? 0;
    const handler = this.proxyHandler;
    if (!handler) {
      log("proxy connection %d from guest port %d while not listening: cancelled", id, peerPort);
      const op = new TcpStream(this, id, true);
      this.streams.set(id, op);
      op.done.catch(() => {});
      op.abandon(new AgentError("AGENT_PROXY_STOPPED", "the host is not serving the guest's proxy"));
      return;
    }
    const op = new TcpStream(this, id, true);
    this.streams.set(id, op);
    this.updateRef();
    handler(op, { peerPort });
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

  /** @internal Like send, but silently does nothing on a dead connection. */
  trySend(type: number, stream: number, payload?: Buffer, flags = 0): void {
    if (!this.fatal) this.channel.write(encodeFrame(type, stream, payload, flags));
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
      // Ids from AGENT_STREAM_BASE up are the agent's (PROXY_CONN).
      this.nextId = this.nextId >= AGENT_STREAM_BASE - 1 ? 1 : this.nextId + 1;
      if (!this.streams.has(id) && !this.pings.has(id)) return id;
    }
  }

  private checkAlive(): void {
    if (this.fatal) throw this.fatal;
  }

  private open<T extends StreamOp>(op: T, type: number, payload: Buffer): T {
    this.streams.set(op.id, op);
    this.updateRef();
    this.send(type, op.id, payload);
    return op;
  }

  /**
   * HELLO: `entropy` is mixed into the guest RNG, which is then reseeded; a `vmId` the VM does
   * not have yet gives it a new identity (PROTOCOL.md: `/run/supermachine/vm-id`, a new boot_id).
   */
  hello(opts: { entropy?: Buffer; vmId?: string; timeoutMs?: number } = {}): Promise<HelloInfo> {
    this.checkAlive();
    const w = new FieldWriter()
      .u16(Tag.hello.versionMin, PROTOCOL_VERSION)
      .u16(Tag.hello.versionMax, PROTOCOL_VERSION)
      .u64(Tag.hello.hostTimeNs, BigInt(Date.now()) * 1_000_000n);
    if (opts.entropy) w.bytes(Tag.hello.entropy, opts.entropy);
    if (opts.vmId !== undefined) w.bytes(Tag.hello.vmId, opts.vmId);
    // A HELLO ends the agent's proxy listener (PROTOCOL.md, PROXY_LISTEN).
    this.proxyHandler = undefined;
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
  ping(payload: Buffer = Buffer.alloc(0), opts: { timeoutMs?: number } = {}): Promise<number> {
    this.checkAlive();
    if (payload.length > MAX_PING_PAYLOAD) throw new AgentError("AGENT_PING_TOO_LARGE", `ping payload over ${MAX_PING_PAYLOAD} bytes`);
    const id = this.allocId();
    const t0 = performance.now();
    return new Promise<number>((resolve, reject) => {
      const timer =
        opts.timeoutMs === undefined
          ? undefined
          : setTimeout(() => done(new AgentError("AGENT_PING_TIMEOUT", `the agent did not answer a ping within ${opts.timeoutMs} ms`)), opts.timeoutMs);
      const done = (err?: Error, echo?: Buffer) => {
        clearTimeout(timer);
        this.off("fatal", onFatal);
        this.pings.delete(id);
        this.updateRef();
        if (err) reject(err);
        else if (!echo!.equals(payload)) reject(new AgentError("AGENT_PROTOCOL", "PONG payload differs from PING"));
        else resolve(performance.now() - t0);
      };
      const onFatal = (e: Error) => done(e);
      this.once("fatal", onFatal);
      this.pings.set(id, (echo) => done(undefined, echo));
      this.updateRef();
      this.send(Msg.PING, id, payload);
    });
  }

  exec(req: ExecRequest, opts: { autoGrant?: boolean } = {}): ExecStream {
    this.checkAlive();
    const w = new FieldWriter();
    for (const a of req.argv) w.bytes(Tag.exec.argv, a);
    for (const e of req.env) w.bytes(Tag.exec.env, e);
    if (req.cwd !== undefined) w.bytes(Tag.exec.cwd, req.cwd);
    if (req.timeoutMs) w.u64(Tag.exec.timeoutMs, Math.ceil(req.timeoutMs));
    if (req.uid !== undefined) w.u32(Tag.exec.uid, req.uid);
    if (req.gid !== undefined) w.u32(Tag.exec.gid, req.gid);
    if (req.stdin) w.u8(Tag.exec.stdin, 1);
    if (req.tty) w.u8(Tag.exec.tty, 1).u16(Tag.exec.cols, req.tty.cols).u16(Tag.exec.rows, req.tty.rows);
    for (const a of req.chain ?? []) w.bytes(Tag.exec.chain, a);
    if (req.limits?.pidsMax) w.u32(Tag.exec.pidsMax, req.limits.pidsMax);
    if (req.limits?.memoryMaxBytes) w.u64(Tag.exec.memoryMax, req.limits.memoryMaxBytes);
    if (req.detach) w.u8(Tag.exec.detach, 1);
    return this.open(new ExecStream(this, this.allocId(), opts.autoGrant ?? true), Msg.EXEC, w.finish());
  }

  /** Opens a TCP connection from the guest to its own `addr:port` (default 127.0.0.1). */
  tcpConnect(port: number, addr?: string): TcpStream {
    this.checkAlive();
    const w = new FieldWriter().u16(Tag.tcpConnect.port, port);
    if (addr !== undefined) w.bytes(Tag.tcpConnect.addr, addr);
    return this.open(new TcpStream(this, this.allocId()), Msg.TCP_CONNECT, w.finish());
  }

  /** Starts a WRITE_FILE; feed it with `write` and end it with `finish`. */
  openWrite(path: string, opts: { mode?: number; uid?: number; gid?: number; size?: number } = {}): FileWriter {
    this.checkAlive();
    const w = new FieldWriter().bytes(Tag.writeFile.path, path).u32(Tag.writeFile.mode, opts.mode ?? 0o644);
    if (opts.size !== undefined) w.u64(Tag.writeFile.size, opts.size);
    if (opts.uid !== undefined) w.u32(Tag.writeFile.uid, opts.uid);
    if (opts.gid !== undefined) w.u32(Tag.writeFile.gid, opts.gid);
    const op = this.open(new RequestOp(this, this.allocId(), `write ${path}`), Msg.WRITE_FILE, w.finish());
    let finished = false;
    return {
      id: op.id,
      write: (chunk) => {
        if (finished) return Promise.reject(new AgentError("AGENT_STREAM_ENDED", `write ${path}: write after finish`));
        return sendWindowed(this, op.id, op.sendWindow, chunk, op.gone);
      },
      finish: async () => {
        if (!finished && !op.ended) this.send(Msg.DATA, op.id, undefined, Channel.STDIN | FLAG_EOF);
        finished = true;
        return Number((await op.result).u64(Tag.ok.size) ?? 0n);
      },
      abandon: (err) => op.abandon(err),
    };
  }

  async writeFile(path: string, data: Buffer, opts: { mode?: number; uid?: number; gid?: number } = {}): Promise<void> {
    const w = this.openWrite(path, { ...opts, size: data.length });
    await w.write(data);
    await w.finish();
  }

  /**
   * Starts a READ_FILE. With `autoGrant` (default) credit is returned as chunks arrive; a
   * streaming consumer passes false and calls `consumed`.
   */
  openRead(path: string, maxSize = 0, autoGrant = true): FileReader {
    this.checkAlive();
    const w = new FieldWriter().bytes(Tag.readFile.path, path).u64(Tag.readFile.maxSize, maxSize);
    const op = this.open(new RequestOp(this, this.allocId(), `read ${path}`, maxSize || Infinity, autoGrant), Msg.READ_FILE, w.finish());
    const reader: FileReader = {
      id: op.id,
      get onData() {
        return op.onData;
      },
      set onData(fn) {
        op.onData = fn;
      },
      consumed: (n) => op.consumed(n),
      done: op.result.then((f) => Number(f.u64(Tag.ok.size) ?? 0n)),
      abandon: (err) => op.abandon(err),
    };
    reader.done.catch(() => {});
    return reader;
  }

  async readFile(path: string, maxSize = 0): Promise<Buffer> {
    const r = this.openRead(path, maxSize);
    const chunks: Buffer[] = [];
    r.onData = (c) => chunks.push(c);
    await r.done;
    return Buffer.concat(chunks);
  }

  /** Ask the agent to time `count` spawn+reap cycles of `argv` itself (guest clock). */
  async spawnBench(argv: string[], count: number, env: string[] = []): Promise<number[]> {
    this.checkAlive();
    const w = new FieldWriter();
    for (const a of argv) w.bytes(Tag.spawnBench.argv, a);
    w.u32(Tag.spawnBench.count, count);
    for (const e of env) w.bytes(Tag.spawnBench.env, e);
    const op = this.open(new RequestOp(this, this.allocId(), `spawn bench ${argv.join(" ")}`), Msg.SPAWN_BENCH, w.finish());
    const f = await op.result;
    return f.u64Array(Tag.ok.samplesNs).map((ns) => Number(ns) / 1e6);
  }

  /** Starts the image's workload (PROTOCOL.md: WORKLOAD_START). Resolves with its guest pid. */
  async startWorkload(req: Omit<ExecRequest, "stdin" | "timeoutMs" | "tty" | "chain">): Promise<number> {
    this.checkAlive();
    const w = new FieldWriter();
    for (const a of req.argv) w.bytes(Tag.exec.argv, a);
    for (const e of req.env) w.bytes(Tag.exec.env, e);
    if (req.cwd !== undefined) w.bytes(Tag.exec.cwd, req.cwd);
    if (req.uid !== undefined) w.u32(Tag.exec.uid, req.uid);
    if (req.gid !== undefined) w.u32(Tag.exec.gid, req.gid);
    const op = this.open(new RequestOp(this, this.allocId(), `start workload ${req.argv[0] ?? ""}`), Msg.WORKLOAD_START, w.finish());
    return (await op.result).u32(Tag.ok.pid) ?? -1;
  }

  /** Sends `signum` to the workload's process group. */
  async signalWorkload(signum: number): Promise<void> {
    this.checkAlive();
    const op = this.open(
      new RequestOp(this, this.allocId(), `signal ${signum} to the workload`),
      Msg.WORKLOAD_SIGNAL,
      new FieldWriter().u32(Tag.signal.signum, signum).finish(),
    );
    await op.result;
  }

  /** Processes execs left running after their main process ended (LIST_BACKGROUND). */
  async listBackground(): Promise<BackgroundEntry[]> {
    this.checkAlive();
    const op = this.open(new RequestOp(this, this.allocId(), "list background processes"), Msg.LIST_BACKGROUND, Buffer.alloc(0));
    const f = await op.result;
    return f.all(Tag.ok.entry).map((raw) => {
      const e = new Fields(raw, "background entry");
      return {
        id: e.u32(Tag.backgroundEntry.id) ?? 0,
        argv: e.all(Tag.backgroundEntry.argv).map((a) => a.toString("utf8")),
        pids: e.all(Tag.backgroundEntry.pid).map((p) => {
          if (p.length !== 4) throw new AgentError("AGENT_PROTOCOL", `background entry: pid of ${p.length} bytes`);
          return p.readUInt32LE(0);
        }),
        detached: (e.u8(Tag.backgroundEntry.detached) ?? 0) === 1,
      };
    });
  }

  /**
   * Kills processes execs left running (KILL_BACKGROUND): one exec's (`id`), or every exec's
   * not started with `detach` (with `all`, those too). Resolves with how many execs' were killed.
   */
  async killBackground(target: { id?: number; all?: boolean } = {}): Promise<number> {
    this.checkAlive();
    const w = new FieldWriter();
    if (target.id !== undefined) w.u32(Tag.killBackground.id, target.id);
    if (target.all) w.u8(Tag.killBackground.all, 1);
    const op = this.open(new RequestOp(this, this.allocId(), "kill background processes"), Msg.KILL_BACKGROUND, w.finish());
    return (await op.result).u32(Tag.ok.killed) ?? 0;
  }

  /**
   * PROXY_LISTEN: the agent listens on the guest's `addr:port` (default 127.0.0.1), adds `env`
   * to every exec and workload while it does, and hands each connection accepted there to
   * `onConnection` as a stream (PROXY_CONN) until `proxyStop`, the next `hello` or the end of the
   * connection. Resolves with the port bound.
   */
  async proxyListen(opts: { port: number; addr?: string; env?: string[]; maxStreams?: number }, onConnection: ProxyConnHandler): Promise<number> {
    this.checkAlive();
    const w = new FieldWriter().u16(Tag.proxyListen.port, opts.port);
    if (opts.addr !== undefined) w.bytes(Tag.proxyListen.addr, opts.addr);
    for (const e of opts.env ?? []) w.bytes(Tag.proxyListen.env, e);
    if (opts.maxStreams !== undefined) w.u32(Tag.proxyListen.maxStreams, opts.maxStreams);
    // Connections may arrive before the OK: the handler is in place first.
    this.proxyHandler = onConnection;
    const op = this.open(new RequestOp(this, this.allocId(), `proxy listen on port ${opts.port}`), Msg.PROXY_LISTEN, w.finish());
    try {
      return (await op.result).u16(Tag.proxyListenOk.port) ?? opts.port;
    } catch (err) {
      if (this.proxyHandler === onConnection) this.proxyHandler = undefined;
      throw err;
    }
  }

  /** PROXY_STOP: the listener closes and its connections end (reset). */
  async proxyStop(): Promise<void> {
    this.checkAlive();
    const op = this.open(new RequestOp(this, this.allocId(), "proxy stop"), Msg.PROXY_STOP, Buffer.alloc(0));
    try {
      await op.result;
    } finally {
      this.proxyHandler = undefined;
    }
  }

  /** Ask the guest to power off. The caller waits for the hypervisor to exit. */
  shutdown(): void {
    if (!this.fatal) this.send(Msg.SHUTDOWN, 0);
  }
}
