/**
 * Flow control of the agent protocol (PROTOCOL.md section 3), per stream channel: the window the
 * agent may still fill on the receive side (credit returned in lumps as the consumer takes the
 * bytes), the agent's window on the send side, and sending within it.
 */
import { Channel, DATA_CHUNK, INITIAL_WINDOW, Msg } from "./protocol.js";
import { AgentError } from "../errors.js";

/** A promise with its settle functions; settles once, and never counts as unhandled. */
export class Deferred<T> {
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

/**
 * Receive side of one channel: the window the peer may still fill, and credit consumed but not
 * yet returned. Credit goes back in lumps of at least a quarter window, so interactive traffic
 * (many small messages) does not cost a WINDOW frame, and a guest wake-up, per message; the
 * peer never runs dry, since what is held back is under a quarter of the window.
 */
export class RecvWindow {
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
export class SendWindow {
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

/** Where a stream's frames go (the connection). */
export interface FrameSink {
  send(type: number, stream: number, payload?: Buffer, flags?: number): void;
}

/** Sends `data` on channel 0 of stream `id` within its window, in DATA_CHUNK pieces. */
export async function sendWindowed(client: FrameSink, id: number, win: SendWindow, data: Buffer, isDead: () => Error | undefined): Promise<void> {
  let off = 0;
  while (off < data.length) {
    const n = await win.acquire(Math.min(DATA_CHUNK, data.length - off), isDead);
    const dead = isDead();
    if (dead) throw dead;
    client.send(Msg.DATA, id, data.subarray(off, off + n), Channel.STDIN);
    off += n;
  }
}

