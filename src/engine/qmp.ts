/**
 * Minimal QMP (QEMU Machine Protocol) client: JSON lines over a unix socket. QEMU connects to
 * a socket we listen on, greets, and we negotiate capabilities before the first command.
 */
import { EventEmitter } from "node:events";
import type { Socket } from "node:net";
import { EngineError } from "../errors.js";
import { logger } from "../debug.js";

const log = logger("qmp");
/** A QMP line longer than this from QEMU is treated as a broken channel. */
const MAX_LINE = 16 * 1024 * 1024;

export interface QmpCallOptions {
  /** Aborting rejects the command's promise with the signal's reason (QEMU may still run it). */
  signal?: AbortSignal;
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  command: string;
}

export class QmpClient extends EventEmitter {
  private buf = "";
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private closed: Error | undefined;
  private readonly ready: Promise<void>;

  constructor(private readonly socket: Socket) {
    super();
    socket.setEncoding("utf8");
    let greeted!: () => void;
    let failed!: (e: Error) => void;
    const greeting = new Promise<void>((res, rej) => {
      greeted = res;
      failed = rej;
    });
    greeting.catch(() => {});
    this.once("greeting", greeted);
    this.once("closed", failed);
    socket.on("data", (chunk: string) => this.onData(chunk));
    socket.on("error", (e) => this.fail(new EngineError("QMP_CHANNEL", `QMP socket error: ${e.message}`, { cause: e })));
    socket.on("close", () => this.fail(new EngineError("QMP_CLOSED", "QMP connection closed")));
    this.ready = greeting.then(() => this.command("qmp_capabilities").then(() => undefined));
    this.ready.catch(() => {});
  }

  private onData(chunk: string): void {
    this.buf += chunk;
    if (this.buf.length > MAX_LINE) {
      this.fail(new EngineError("QMP_PROTOCOL", "QMP line too long"));
      this.socket.destroy();
      return;
    }
    let nl: number;
    while ((nl = this.buf.indexOf("\n")) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line) this.onLine(line);
    }
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      log("unparsable QMP line: %s", line.slice(0, 200));
      return;
    }
    if ("QMP" in msg) {
      this.emit("greeting", msg.QMP);
      return;
    }
    if (typeof msg.event === "string") {
      log("event %s", msg.event);
      this.emit("event", msg.event, msg.data);
      return;
    }
    const id = typeof msg.id === "string" ? msg.id : undefined;
    const p = id ? this.pending.get(id) : undefined;
    if (!p || !id) return;
    this.pending.delete(id);
    this.updateRef();
    if ("error" in msg) {
      const e = msg.error as { class?: string; desc?: string };
      p.reject(new EngineError("QMP_COMMAND_FAILED", `QMP ${p.command} failed: ${e.desc ?? e.class ?? "unknown error"}`));
    } else {
      p.resolve(msg.return);
    }
  }

  private fail(err: Error): void {
    if (this.closed) return;
    this.closed = err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    this.emit("closed", err);
  }

  private command(execute: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.closed) return Promise.reject(this.closed);
    const id = `c${this.nextId++}`;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, command: execute });
      this.updateRef();
      this.socket.write(JSON.stringify(args ? { execute, arguments: args, id } : { execute, id }) + "\n");
    });
  }

  /** Run a QMP command once the capabilities handshake is done. */
  async execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: QmpCallOptions = {}): Promise<T> {
    const { signal } = opts;
    if (!signal) {
      await this.ready;
      return (await this.command(command, args)) as T;
    }
    signal.throwIfAborted();
    let onAbort!: () => void;
    const aborted = new Promise<never>((_, reject) => {
      onAbort = () => reject(signal.reason);
      signal.addEventListener("abort", onAbort, { once: true });
    });
    try {
      await Promise.race([this.ready, aborted]);
      return (await Promise.race([this.command(command, args), aborted])) as T;
    } finally {
      signal.removeEventListener("abort", onAbort);
    }
  }

  close(): void {
    this.socket.destroy();
  }

  /**
   * From now on the connection keeps the owner's event loop alive only while a command is in
   * flight (an idle VM must not keep a program from exiting).
   */
  unref(): void {
    this.refWhenIdle = false;
    this.updateRef();
  }

  private refWhenIdle = true;
  private updateRef(): void {
    if (this.refWhenIdle || this.pending.size > 0) this.socket.ref();
    else this.socket.unref();
  }
}
