/**
 * The operations that own a stream id until the agent ends it (PROTOCOL.md section 2): a process
 * (ExecStream), a guest TCP connection (TcpStream), and a request answered with OK, file
 * transfers among them (RequestOp). Each checks the frames of its stream against its windows
 * and settles its promises; the connection (./connection.ts) routes frames to them.
 */
import { logger } from "../debug.js";
import { AgentError } from "../errors.js";
import { AgentStreamError, type ExitInfo } from "./messages.js";
import { Channel, CHANNEL_MASK, DATA_CHUNK, Fields, FieldWriter, FLAG_EOF, type Frame, Msg, StreamErrorCode, Tag, windowPayload } from "./protocol.js";
import { Deferred, RecvWindow, SendWindow, sendWindowed, type FrameSink } from "./windows.js";

const log = logger("agent");

/** What a stream needs from its connection: to send frames, and to give its id back. */
export interface StreamOwner extends FrameSink {
  trySend(type: number, stream: number, payload?: Buffer, flags?: number): void;
  forget(id: number): void;
}

/** Base for operations that own a stream id until the agent ends it. */
export abstract class StreamOp {
  ended = false;
  constructor(
    protected readonly client: StreamOwner,
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
    const name = StreamErrorCode[code] ?? "UNKNOWN";
    const message = f.string(Tag.streamError.message) ?? "";
    return new AgentStreamError(name, `${what}: ${message || (name === "UNKNOWN" ? `error code ${code}` : name)}`, f.u32(Tag.streamError.errno));
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
    client: StreamOwner,
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
  constructor(client: StreamOwner, id: number, accepted = false) {
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
 * WORKLOAD_*, FS_*). For READ_FILE, FS_LIST and FS_WATCH the content arrives through `onData`;
 * credit goes back at once (`autoGrant`, buffered reads) or as the consumer calls `consumed`
 * (streams). `started` settles on the STARTED of a request that sends one (FS_WATCH).
 */
export class RequestOp extends StreamOp {
  private readonly outcome = new Deferred<Fields>();
  private readonly start = new Deferred<void>();
  readonly sendWindow = new SendWindow();
  private readonly recvWindow: Array<RecvWindow | undefined>;
  private receivedBytes = 0;
  private error: Error | undefined;
  onData: (chunk: Buffer) => void = () => {};

  constructor(
    client: StreamOwner,
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

  /** Resolves on STARTED (or an OK without one); rejects as `result` does. */
  get started(): Promise<void> {
    return this.start.promise;
  }

  onFrame(frame: Frame): void {
    switch (frame.type) {
      case Msg.STARTED:
        this.start.resolve();
        return;
      case Msg.OK: {
        const fields = new Fields(frame.payload, "OK");
        this.end();
        this.sendWindow.wake();
        this.start.resolve();
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
    this.start.reject(err);
    this.outcome.reject(err);
  }
}

