/**
 * Host-side deadlines and cancellation for calls into a VM: every call that waits on the guest
 * races its own deadline and the caller's AbortSignal, so a guest that stops answering can never
 * hang the caller.
 */
import { DeadlineError } from "./errors.js";

export interface CallScope {
  /** Aborted when the deadline passes (reason: a DeadlineError) or the caller aborts (its reason). */
  readonly signal: AbortSignal;
  /** Rejects as soon as `signal` aborts; otherwise settles like `p`. */
  race<T>(p: Promise<T>): Promise<T>;
  /** Stops the timer and detaches from the caller's signal. Call in `finally`. */
  done(): void;
}

/**
 * A scope for one call: `what` names the call in the timeout error; `timeoutMs` undefined means
 * no deadline (only the caller's signal).
 */
export function callScope(what: string, timeoutMs: number | undefined, user?: AbortSignal): CallScope {
  const ac = new AbortController();
  const onUser = () => ac.abort(user!.reason);
  if (user?.aborted) ac.abort(user.reason);
  else user?.addEventListener("abort", onUser, { once: true });
  const timer =
    timeoutMs === undefined || ac.signal.aborted
      ? undefined
      : setTimeout(
          () =>
            ac.abort(
              new DeadlineError("CALL_TIMEOUT", `${what}: no result within ${timeoutMs} ms`, {
                hint: "the guest may be overloaded or hung; pass a larger timeoutMs, or release this VM and acquire another",
              }),
            ),
          timeoutMs,
        );
  const aborted = new Promise<never>((_, reject) => {
    if (ac.signal.aborted) reject(ac.signal.reason);
    else ac.signal.addEventListener("abort", () => reject(ac.signal.reason), { once: true });
  });
  aborted.catch(() => {});
  return {
    signal: ac.signal,
    race: (p) => Promise.race([p, aborted]),
    done: () => {
      clearTimeout(timer);
      user?.removeEventListener("abort", onUser);
    },
  };
}
