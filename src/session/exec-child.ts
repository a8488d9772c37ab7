/**
 * `ExecChild`: a process started by `vm.spawn`, with its stdin, stdout and stderr streamed.
 * Reads are pull-style (`readStdout`, `readStderr`: a zero-length Buffer at EOF) or through
 * Node streams (`child.stdout.pipe(...)`, `for await (const c of child.stdout)`), and flow
 * control runs end to end: output nobody reads stops the process in the guest once one window
 * (256 KiB per stream) is buffered on the host.
 */
import { constants as osConstants } from "node:os";
import { Writable, type Readable } from "node:stream";
import type { ExecStream, ExitInfo } from "../agent/client.js";
import { ExecError, OptionError } from "../errors.js";
import { parseOptions } from "../schema/parse.js";
import { signalSchema } from "../schema/fields.js";
import { DEFAULT_READ_BYTES, OutputQueue } from "../output-queue.js";
import { z } from "zod";

export interface ExecWaitResult {
  /** Exit status; -1 when killed by a signal or the timeout. */
  exitCode: number;
  /** The guest-side timeout (`timeoutMs`) killed it. */
  timedOut: boolean;
  /** Peak resident set size of the process in KiB (`ru_maxrss`), when the guest reported it. */
  peakRssKib: number | null;
  /** Name of the signal that ended it, or null. */
  signal: string | null;
  /** Guest time from start to exit. */
  durationMs: number;
  /** The exec reached its memory limit and the OOM killer ended it. */
  oomKilled: boolean;
  /** A fork in the exec failed at its process limit. */
  pidsLimited: boolean;
}

const signalNames = new Map(Object.entries(osConstants.signals).map(([name, n]) => [n, name]));
export function signalName(n: number): string | null {
  return n ? (signalNames.get(n) ?? `SIG${n}`) : null;
}

/** @internal What a process's EXIT says, as ExecChild.wait reports it. */
export function waitResult(e: ExitInfo): ExecWaitResult {
  return {
    exitCode: e.exitCode,
    timedOut: e.timedOut,
    peakRssKib: e.peakRssKib,
    signal: signalName(e.signal),
    durationMs: e.durationUs / 1000,
    oomKilled: e.oomKilled,
    pidsLimited: e.pidsLimited,
  };
}

const dims = z.object({ cols: z.number().int().min(1).max(65535), rows: z.number().int().min(1).max(65535) });

export class ExecChild {
  private readonly out: OutputQueue;
  private readonly err: OutputQueue;
  private stdinStream: Writable | undefined;
  private readonly result: Promise<ExecWaitResult>;

  private constructor(
    private readonly stream: ExecStream,
    /** argv[0], for messages. */
    private readonly name: string,
    /** Whether the process runs on a terminal. */
    readonly tty: boolean,
    /** Turns a stream failure into the error callers see (e.g. VM_DEAD). */
    explain: (e: unknown) => Error,
  ) {
    this.out = new OutputQueue((n) => stream.consumed(1, n), `${name}: stdout`);
    this.err = new OutputQueue((n) => stream.consumed(2, n), `${name}: stderr`);
    stream.onStdout = (c) => this.out.push(c);
    stream.onStderr = (c) => this.err.push(c);
    stream.onOutputEnd = (ch) => (ch === 1 ? this.out : this.err).end();
    this.result = stream.wait().then(waitResult, (e: unknown) => {
      const err = explain(e);
      this.out.fail(err);
      this.err.fail(err);
      this.stdinStream?.destroy(err);
      throw err;
    });
    this.result.catch(() => {});
  }

  /** @internal How the library makes one (users get it from the API, never by `new`). */
  static create(stream: ExecStream, name: string, tty: boolean, explain: (e: unknown) => Error): ExecChild {
    return new ExecChild(stream, name, tty, explain);
  }

  /** Guest pid of the process (undefined if it never started, e.g. command not found). */
  get pid(): number | undefined {
    return this.stream.pid;
  }

  /** The exec's id in the guest, as `vm.listBackground()` names it (undefined without cgroups). */
  get execId(): number | undefined {
    return this.stream.execId;
  }

  /** True once the process has exited (or the stream failed). */
  get exited(): boolean {
    return this.stream.ended;
  }

  /** Sends bytes to the process's stdin; resolves once they are on their way (flow control). */
  async writeStdin(bytes: Buffer | Uint8Array | string): Promise<void> {
    const buf = typeof bytes === "string" ? Buffer.from(bytes) : Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (this.stream.stdinIsClosed) {
      throw new ExecError("EXEC_STDIN_CLOSED", `${this.name}: stdin is already closed`, { hint: "closeStdin() ends the input for good" });
    }
    if (this.stream.ended) throw this.gone("writeStdin");
    try {
      await this.stream.write(buf);
    } catch (e) {
      throw this.stream.failure ?? this.gone("writeStdin", e);
    }
  }

  /** Ends stdin (on a terminal: sends the end-of-file character, ^D). Idempotent. */
  async closeStdin(): Promise<void> {
    this.stream.closeStdin();
  }

  /** Up to `maxBytes` (default 64 KiB) of stdout as soon as some is there; empty at EOF. */
  readStdout(maxBytes = DEFAULT_READ_BYTES): Promise<Buffer> {
    return this.out.read(maxBytes);
  }

  /** Like readStdout, for stderr (on a terminal, stderr is merged into stdout: EOF at once). */
  readStderr(maxBytes = DEFAULT_READ_BYTES): Promise<Buffer> {
    return this.err.read(maxBytes);
  }

  /** stdout as a Node Readable. Use it or readStdout, not both. */
  get stdout(): Readable {
    return this.out.stream();
  }

  /** stderr as a Node Readable. Use it or readStderr, not both. */
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
        this.stream.closeStdin();
        cb();
      },
    });
    return this.stdinStream;
  }

  /** Sends a signal (number or name, e.g. 15 or "SIGTERM") to the process. */
  async signal(signum: number | string): Promise<void> {
    const n = parseOptions("child.signal", z.object({ signum: signalSchema }), { signum }).signum;
    if (this.stream.ended) {
      throw new ExecError("EXEC_ALREADY_EXITED", `child.signal(${String(signum)}): ${this.name} has already exited`, {
        hint: "check child.exited, or await child.wait() for how it ended",
      });
    }
    this.stream.signal(n);
  }

  /** Changes the terminal size (what `stty size` prints). No-op without a tty or after exit. */
  async resize(cols: number, rows: number): Promise<void> {
    const r = dims.safeParse({ cols, rows });
    if (!r.success) {
      throw new OptionError("OPTION_INVALID", `child.resize(${String(cols)}, ${String(rows)}): cols and rows must be integers from 1 to 65535`);
    }
    if (!this.tty || this.stream.ended) return;
    this.stream.resize(cols, rows);
  }

  /**
   * Resolves when the process has exited and its output has been delivered. Keep reading (or
   * piping) stdout and stderr meanwhile: like a pipe, output nobody reads holds the process up.
   */
  wait(): Promise<ExecWaitResult> {
    return this.result;
  }

  private gone(what: string, cause?: unknown): ExecError {
    return new ExecError("EXEC_PROCESS_EXITED", `child.${what}: ${this.name} has exited`, cause === undefined ? {} : { cause });
  }
}
