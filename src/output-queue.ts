/**
 * One output channel of a guest stream (a process's stdout or stderr, a file being read; locally
 * or through `supermachine serve`'s remote client), as the consumer sees it: a queue that holds at most the agent's window of bytes, read
 * pull-style (`read`) or as a Node Readable (`stream()`), never both. Window credit goes back
 * to the producer (the agent, or the remote client's socket) only as bytes leave the queue, so a consumer that stops reading stops the
 * producer in the guest and host memory stays bounded.
 */
import { Readable } from "node:stream";
import { ExecError } from "./errors.js";

/** Largest piece a pull read returns when the caller does not say. */
export const DEFAULT_READ_BYTES = 64 * 1024;

export class OutputQueue {
  private chunks: Buffer[] = [];
  private queued = 0;
  private ended = false;
  private error: Error | undefined;
  private readers: Array<{ max: number; resolve: (b: Buffer) => void; reject: (e: Error) => void }> = [];
  private readable: Readable | undefined;
  private streamWants = false;
  private eofPushed = false;

  constructor(
    /** Returns `n` bytes of credit to the producer. */
    private readonly credit: (n: number) => void,
    private readonly name: string,
  ) {}

  /** Bytes held (received, not yet consumed). */
  get buffered(): number {
    return this.queued;
  }

  push(chunk: Buffer): void {
    if (this.ended || this.error) return;
    this.chunks.push(chunk);
    this.queued += chunk.length;
    this.drain();
  }

  end(): void {
    if (this.ended) return;
    this.ended = true;
    this.drain();
  }

  fail(err: Error): void {
    if (this.ended || this.error) return;
    this.error = err;
    this.chunks = [];
    this.queued = 0;
    for (const r of this.readers.splice(0)) r.reject(err);
    this.readable?.destroy(err);
  }

  /** Up to `max` bytes as soon as any are there; a zero-length Buffer at EOF. */
  read(max = DEFAULT_READ_BYTES): Promise<Buffer> {
    if (this.readable) {
      return Promise.reject(
        new ExecError("EXEC_STREAM_IN_USE", `${this.name}: this output is consumed through its Node stream`, {
          hint: "read it either with the stream or with the pull-style read calls, not both",
        }),
      );
    }
    if (!Number.isInteger(max) || max < 1) {
      return Promise.reject(new ExecError("EXEC_READ_SIZE", `${this.name}: maxBytes must be a positive integer, got ${String(max)}`));
    }
    if (this.error) return Promise.reject(this.error);
    return new Promise<Buffer>((resolve, reject) => {
      this.readers.push({ max, resolve, reject });
      this.drain();
    });
  }

  /** A Readable over this output (created once; from then on it is the only consumer). */
  stream(): Readable {
    if (!this.readable) {
      this.readable = new Readable({
        highWaterMark: DEFAULT_READ_BYTES,
        read: () => {
          this.streamWants = true;
          this.drain();
        },
      });
      if (this.error) this.readable.destroy(this.error);
    }
    return this.readable;
  }

  private take(max: number): Buffer {
    const first = this.chunks[0]!;
    let out: Buffer;
    if (first.length <= max) {
      this.chunks.shift();
      out = first;
    } else {
      out = first.subarray(0, max);
      this.chunks[0] = first.subarray(max);
    }
    this.queued -= out.length;
    this.credit(out.length);
    return out;
  }

  private drain(): void {
    if (this.error) return;
    if (this.readable) {
      while (this.streamWants && this.chunks.length) this.streamWants = this.readable.push(this.take(Infinity));
      if (this.ended && this.chunks.length === 0 && !this.eofPushed) {
        this.eofPushed = true;
        this.readable.push(null);
      }
      return;
    }
    while (this.readers.length && (this.chunks.length || this.ended)) {
      const r = this.readers.shift()!;
      r.resolve(this.chunks.length ? this.take(r.max) : Buffer.alloc(0));
    }
  }
}
