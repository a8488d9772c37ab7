/**
 * Host-side deadlines and cancellation for calls into a VM: every call that waits on the guest
 * races its own deadline and the caller's AbortSignal, so a guest that stops answering can never
 * hang the caller.
 *
 * A scope is on the hot path of every exec, so it is light: a timer and a listener list, no
 * AbortController unless somebody asks for `signal` (APIs that take a real AbortSignal).
 */
import { DeadlineError } from "./errors.js";

export class CallScope {
  private reasonValue: unknown;
  private isAborted = false;
  private listeners: Array<(reason: unknown) => void> = [];
  private timer: NodeJS.Timeout | undefined;
  private controller: AbortController | undefined;
  private aborted: Promise<never> | undefined;
  private readonly onUser: (() => void) | undefined;

  constructor(
    private readonly what: string,
    timeoutMs: number | undefined,
    private readonly user?: AbortSignal,
  ) {
    if (user?.aborted) {
      this.abort(user.reason);
      return;
    }
    if (user) {
      this.onUser = () => this.abort(user.reason);
      user.addEventListener("abort", this.onUser, { once: true });
    }
    if (timeoutMs !== undefined) {
      this.timer = setTimeout(
        () =>
          this.abort(
            new DeadlineError("CALL_TIMEOUT", `${this.what}: no result within ${timeoutMs} ms`, {
              hint: "the guest may be overloaded or hung; pass a larger timeoutMs, or release this VM and acquire another",
            }),
          ),
        timeoutMs,
      );
    }
  }

  /** Whether the deadline passed or the caller aborted. */
  get isDone(): boolean {
    return this.isAborted;
  }

  /** Why: a DeadlineError, or the caller's abort reason. */
  get reason(): unknown {
    return this.reasonValue;
  }

  /** An AbortSignal that follows this scope (created on demand). */
  get signal(): AbortSignal {
    if (!this.controller) {
      this.controller = new AbortController();
      if (this.isAborted) this.controller.abort(this.reasonValue);
    }
    return this.controller.signal;
  }

  /** Calls `fn` when the scope aborts (at once if it has); returns the unsubscribe function. */
  onAbort(fn: (reason: unknown) => void): () => void {
    if (this.isAborted) {
      fn(this.reasonValue);
      return () => {};
    }
    this.listeners.push(fn);
    return () => {
      const i = this.listeners.indexOf(fn);
      if (i >= 0) this.listeners.splice(i, 1);
    };
  }

  /** Rejects as soon as the scope aborts; otherwise settles like `p`. */
  race<T>(p: Promise<T>): Promise<T> {
    if (!this.aborted) {
      this.aborted = new Promise<never>((_, reject) => this.onAbort(reject));
      this.aborted.catch(() => {});
    }
    return Promise.race([p, this.aborted]);
  }

  /** Stops the timer and detaches from the caller's signal. Call in `finally`. */
  done(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    if (this.onUser) this.user!.removeEventListener("abort", this.onUser);
  }

  private abort(reason: unknown): void {
    if (this.isAborted) return;
    this.isAborted = true;
    this.reasonValue = reason;
    this.done();
    this.controller?.abort(reason);
    const ls = this.listeners;
    this.listeners = [];
    for (const fn of ls) fn(reason);
  }
}

/**
 * A scope for one call: `what` names the call in the timeout error; `timeoutMs` undefined means
 * no deadline (only the caller's signal).
 */
export function callScope(what: string, timeoutMs: number | undefined, user?: AbortSignal): CallScope {
  return new CallScope(what, timeoutMs, user);
}
