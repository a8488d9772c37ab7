/**
 * `RemoteExecChild`: a process spawned through `supermachine serve`, over one WebSocket, with the
 * interface of the local ExecChild: stdout and stderr as Node Readables or pull reads, stdin as a
 * Writable or `writeStdin`, `signal`, `resize`, `closeStdin`, `wait`. Flow control runs end to end:
 * once a stream holds WINDOW bytes nobody has read, the socket is paused, the server's send
 * buffer fills, it stops taking the process's output, and the guest process waits; stdin writes
 * resolve once the socket has sent them, so a writer cannot run ahead of the connection.
 */
import { Readable, Writable } from "node:stream";
import type WebSocket from "ws";
import { ExecError, OptionError, ServerError, type SupermachineError } from "../errors.js";
import { errorFrom } from "./http.js";
import { DEFAULT_READ_BYTES, OutputQueue } from "../output-queue.js";

/** Bytes one output stream holds unread before the socket is paused (the local window). */
export const WINDOW = 256 * 1024;
const CHANNEL = { stdin: 0, stdout: 1, stderr: 2 } as const;

/** What the local ExecChild.wait() gives. */
export interface RemoteWaitResult {
  exitCode: number;
  timedOut: boolean;
  peakRssKib: number | null;
  signal: string | null;
  durationMs: number;
  oomKilled: boolean;
  pidsLimited: boolean;
}

export class RemoteExecChild {
  private readonly out: OutputQueue;
  private readonly err: OutputQueue;
  private stdinStream: Writable | undefined;
  private readonly result: Promise<RemoteWaitResult>;
  private settle!: { resolve: (r: RemoteWaitResult) => void; reject: (e: Error) => void };
  private ended = false;
  private stdinClosed = false;
  private nextId = 1;
  private readonly acks = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();

  private constructor(
    private readonly ws: WebSocket,
    /** Guest pid of the process (undefined if it never started, e.g. command not found). */
    readonly pid: number | undefined,
    /** Whether the process runs on a terminal. */
    readonly tty: boolean,
    private readonly name: string,
  ) {
    const flow = () => this.flow();
    // Bytes taken from a stream are its credit back: the socket resumes once both are below WINDOW.
    this.out = new OutputQueue(flow, `${name}: stdout`);
    this.err = new OutputQueue(flow, `${name}: stderr`);
    // On a terminal, stderr is merged into stdout: EOF at once, as locally.
    if (tty) this.err.end();
    this.result = new Promise((resolve, reject) => (this.settle = { resolve, reject }));
    this.result.catch(() => {});
    ws.on("message", (data: Buffer, binary: boolean) => this.onFrame(data, binary));
    ws.on("close", (code: number, reason: Buffer) => {
      if (this.ended) return;
      this.finish(new ServerError("SERVER_SANDBOX_GONE", `${name}: the connection to the server closed before the process ended (${code}${reason.length ? ` ${reason.toString()}` : ""})`, {
        hint: "the sandbox may have been killed or timed out, or the server drained; a process started without killOnDisconnect keeps running and can be attached again",
      }));
    });
  }

  /** @internal Starts a process on an open process socket: sends the start message, waits for "started". */
  static start(ws: WebSocket, start: Record<string, unknown>, name: string): Promise<RemoteExecChild> {
    return new Promise((resolve, reject) => {
      const onMessage = (data: Buffer, binary: boolean) => {
        if (binary) return;
        const msg = JSON.parse(data.toString("utf8")) as { type: string; pid?: number; tty?: boolean; error?: { code: string; message: string; hint?: string } };
        ws.off("message", onMessage);
        ws.off("close", onClose);
        if (msg.type === "started") resolve(new RemoteExecChild(ws, msg.pid || undefined, msg.tty === true, name));
        else if (msg.type === "error" && msg.error) reject(errorFrom(msg.error.code, msg.error.message, msg.error.hint));
        else reject(new ServerError("SERVER_PROTOCOL", `${name}: the server answered the start with ${JSON.stringify(msg.type)}`, { hint: "client and server versions may differ" }));
      };
      const onClose = (code: number) => reject(new ServerError("SERVER_PROTOCOL", `${name}: the server closed the process socket (${code}) before the process started`, { hint: "see the server's log" }));
      ws.on("message", onMessage);
      ws.once("close", onClose);
      ws.send(JSON.stringify(start));
    });
  }

  private onFrame(data: Buffer, binary: boolean): void {
    if (binary) {
      if (data[0] === CHANNEL.stdout) this.out.push(data.subarray(1));
      else if (data[0] === CHANNEL.stderr) this.err.push(data.subarray(1));
      this.flow();
      return;
    }
    const msg = JSON.parse(data.toString("utf8")) as { type: string; id?: number; result?: RemoteWaitResult; error?: { code: string; message: string; hint?: string } };
    if (msg.type === "ack" && msg.id !== undefined) {
      const a = this.acks.get(msg.id);
      this.acks.delete(msg.id);
      if (msg.error) a?.reject(errorFrom(msg.error.code, msg.error.message, msg.error.hint));
      else a?.resolve();
    } else if (msg.type === "exit" && msg.result) {
      this.finish(undefined, msg.result);
    } else if (msg.type === "error" && msg.error) {
      this.finish(errorFrom(msg.error.code, msg.error.message, msg.error.hint));
    }
  }

  private finish(err: SupermachineError | undefined, result?: RemoteWaitResult): void {
    if (this.ended) return;
    this.ended = true;
    if (err) {
      this.out.fail(err);
      this.err.fail(err);
      this.stdinStream?.destroy(err);
      for (const a of this.acks.values()) a.reject(err);
      this.settle.reject(err);
    } else {
      this.out.end();
      this.err.end();
      const gone = this.gone("signal");
      for (const a of this.acks.values()) a.reject(gone);
      this.settle.resolve(result!);
    }
    this.acks.clear();
    if (this.ws.readyState === this.ws.OPEN) this.ws.close(1000);
  }

  /** Pauses the socket while either stream holds a window unread. */
  private flow(): void {
    const full = this.out.buffered >= WINDOW || this.err.buffered >= WINDOW;
    if (full && !this.ws.isPaused) this.ws.pause();
    else if (!full && this.ws.isPaused) this.ws.resume();
  }

  private control(msg: Record<string, unknown>): Promise<void> {
    if (this.ended) return Promise.reject(this.gone(String(msg.type)));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.acks.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ ...msg, id }));
    });
  }

  /** True once the process has exited (or the connection failed). */
  get exited(): boolean {
    return this.ended;
  }

  /** Sends bytes to the process's stdin; resolves once the socket has sent them (flow control). */
  async writeStdin(bytes: Buffer | Uint8Array | string): Promise<void> {
    const buf = typeof bytes === "string" ? Buffer.from(bytes) : Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (this.stdinClosed) throw new ExecError("EXEC_STDIN_CLOSED", `${this.name}: stdin is already closed`, { hint: "closeStdin() ends the input for good" });
    if (this.ended) throw this.gone("writeStdin");
    await new Promise<void>((resolve, reject) => this.ws.send(Buffer.concat([Buffer.of(CHANNEL.stdin), buf]), (err) => (err ? reject(this.gone("writeStdin")) : resolve())));
  }

  /** Ends stdin (on a terminal: sends ^D). Idempotent. */
  async closeStdin(): Promise<void> {
    if (this.stdinClosed || this.ended) return;
    this.stdinClosed = true;
    await this.control({ type: "closeStdin" });
  }

  readStdout(maxBytes = DEFAULT_READ_BYTES): Promise<Buffer> {
    return this.out.read(maxBytes);
  }

  readStderr(maxBytes = DEFAULT_READ_BYTES): Promise<Buffer> {
    return this.err.read(maxBytes);
  }

  get stdout(): Readable {
    return this.out.stream();
  }

  get stderr(): Readable {
    return this.err.stream();
  }

  /** stdin as a Node Writable (`end()` closes stdin). */
  get stdin(): Writable {
    this.stdinStream ??= new Writable({
      highWaterMark: DEFAULT_READ_BYTES,
      write: (chunk: Buffer, _enc, cb) => {
        this.writeStdin(chunk).then(() => cb(), cb);
      },
      final: (cb) => {
        this.closeStdin().then(() => cb(), cb);
      },
    });
    return this.stdinStream;
  }

  /** Sends a signal (number or name) to the process. */
  async signal(signum: number | string): Promise<void> {
    if (typeof signum !== "number" && typeof signum !== "string") throw new OptionError("OPTION_INVALID", `child.signal(${String(signum)}): must be a signal number (1-64) or name`);
    if (this.ended) {
      throw new ExecError("EXEC_ALREADY_EXITED", `child.signal(${String(signum)}): ${this.name} has already exited`, { hint: "check child.exited, or await child.wait() for how it ended" });
    }
    await this.control({ type: "signal", signal: signum });
  }

  /** Changes the terminal size. No-op without a tty or after exit. */
  async resize(cols: number, rows: number): Promise<void> {
    const ok = (n: number) => Number.isInteger(n) && n >= 1 && n <= 65535;
    if (!ok(cols) || !ok(rows)) throw new OptionError("OPTION_INVALID", `child.resize(${String(cols)}, ${String(rows)}): cols and rows must be integers from 1 to 65535`);
    if (!this.tty || this.ended) return;
    await this.control({ type: "resize", cols, rows });
  }

  /** Resolves when the process has exited and its output has been delivered. */
  wait(): Promise<RemoteWaitResult> {
    return this.result;
  }

  private gone(what: string): ExecError {
    return new ExecError("EXEC_PROCESS_EXITED", `child.${what}: ${this.name} has exited`);
  }
}
