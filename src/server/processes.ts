/**
 * The processes a sandbox's clients started through the server, by guest pid (and by tag): each
 * one's output fanned out to whoever follows it at the moment (the request that started it,
 * clients that reconnected), with stdin, signals and terminal size. A follower that leaves does
 * not stop the process; output nobody follows is dropped, as E2B's daemon drops it. A follower
 * that reads slowly holds the process back (up to FOLLOWER_BUFFER bytes, then the guest waits),
 * so a fast producer cannot fill the server's memory.
 */
import type { ExecChild } from "../session/exec-child.js";
import { ServerError } from "./errors.js";

/** Bytes queued for one follower before the output pump waits for it. */
export const FOLLOWER_BUFFER = 4 * 1024 * 1024;

export interface ProcessConfig {
  cmd: string;
  args: string[];
  envs: Record<string, string>;
  cwd?: string | undefined;
}

export interface ProcessEnd {
  exitCode: number;
  /** False when a signal ended it. */
  exited: boolean;
  /** As a shell says it: "exit status 1", "signal: killed". */
  status: string;
  signal: string | null;
  timedOut: boolean;
  error?: string;
}

export type ProcessEvent = { type: "data"; stream: "stdout" | "stderr" | "pty"; data: Buffer } | { type: "end"; end: ProcessEnd };

/** One follower's queue of events, consumed as an async iterator. */
class Follower {
  private readonly queue: ProcessEvent[] = [];
  private bytes = 0;
  private wake: (() => void) | undefined;
  private drained: (() => void) | undefined;
  closed = false;

  push(e: ProcessEvent): void {
    if (this.closed) return;
    this.queue.push(e);
    if (e.type === "data") this.bytes += e.data.length;
    this.wake?.();
  }

  /** Resolves once this follower's queue is below FOLLOWER_BUFFER (or it left). */
  room(): Promise<void> {
    if (this.closed || this.bytes < FOLLOWER_BUFFER) return Promise.resolve();
    return new Promise((r) => (this.drained = r));
  }

  close(): void {
    this.closed = true;
    this.wake?.();
    this.drained?.();
  }

  /** The next event; "idle" after `idleMs` without one; undefined once closed. */
  async next(idleMs: number): Promise<ProcessEvent | "idle" | undefined> {
    for (;;) {
      const e = this.queue.shift();
      if (e) {
        if (e.type === "data") this.bytes -= e.data.length;
        if (this.bytes < FOLLOWER_BUFFER && this.drained) {
          const d = this.drained;
          this.drained = undefined;
          d();
        }
        return e;
      }
      if (this.closed) return undefined;
      let timedOut = false;
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((r) => {
        this.wake = r;
        if (idleMs > 0) timer = setTimeout(() => ((timedOut = true), r()), idleMs);
      });
      clearTimeout(timer);
      this.wake = undefined;
      if (timedOut && this.queue.length === 0 && !this.closed) return "idle";
    }
  }
}

export class ManagedProcess {
  private readonly followers = new Set<Follower>();
  private endInfo: ProcessEnd | undefined;
  readonly ended: Promise<ProcessEnd>;

  constructor(
    readonly pid: number,
    readonly child: ExecChild,
    readonly config: ProcessConfig,
    readonly tag: string | undefined,
    readonly pty: boolean,
  ) {
    this.ended = this.pump();
  }

  get running(): boolean {
    return this.endInfo === undefined;
  }

  /**
   * Follows the process: yields its output from now on and its end. Stops (without touching the
   * process) when `signal` aborts. `keepaliveMs` > 0 yields `undefined` after that long without
   * output, for the caller to send a keepalive.
   */
  follow(signal: AbortSignal, keepaliveMs = 0): AsyncGenerator<ProcessEvent | undefined> {
    // The follower is registered now, not when iteration starts, so nothing produced in between is lost.
    const f = new Follower();
    if (this.endInfo) f.push({ type: "end", end: this.endInfo });
    else this.followers.add(f);
    const leave = () => f.close();
    signal.addEventListener("abort", leave, { once: true });
    const followers = this.followers;
    return (async function* () {
      try {
        for (;;) {
          const e = await f.next(keepaliveMs);
          if (e === undefined) return;
          if (e === "idle") {
            yield undefined;
            continue;
          }
          yield e;
          if (e.type === "end") return;
        }
      } finally {
        signal.removeEventListener("abort", leave);
        f.close();
        followers.delete(f);
      }
    })();
  }

  private async broadcast(e: ProcessEvent): Promise<void> {
    for (const f of this.followers) f.push(e);
    if (e.type === "data") await Promise.all([...this.followers].map((f) => f.room()));
  }

  private async pump(): Promise<ProcessEnd> {
    const read = async (stream: "stdout" | "stderr") => {
      const source = stream === "stdout" ? this.child.stdout : this.child.stderr;
      for await (const chunk of source) await this.broadcast({ type: "data", stream: this.pty ? "pty" : stream, data: chunk as Buffer });
    };
    let end: ProcessEnd;
    try {
      const [r] = await Promise.all([this.child.wait(), read("stdout"), this.pty ? Promise.resolve() : read("stderr")]);
      const signalled = r.signal !== null && r.exitCode === -1;
      end = {
        exitCode: r.exitCode,
        exited: !signalled,
        status: signalled ? `signal: ${describeSignal(r.signal!)}` : `exit status ${r.exitCode}`,
        signal: r.signal,
        timedOut: r.timedOut,
        ...(r.timedOut ? { error: "the process was killed at its timeout" } : {}),
      };
    } catch (err) {
      end = { exitCode: -1, exited: false, status: "error", signal: null, timedOut: false, error: (err as Error).message };
    }
    this.endInfo = end;
    await this.broadcast({ type: "end", end });
    for (const f of this.followers) f.close();
    return end;
  }
}

const SIGNAL_WORDS: Record<string, string> = { SIGKILL: "killed", SIGTERM: "terminated", SIGINT: "interrupt", SIGHUP: "hangup", SIGPIPE: "broken pipe", SIGSEGV: "segmentation fault", SIGABRT: "aborted" };
const describeSignal = (name: string): string => SIGNAL_WORDS[name] ?? name.toLowerCase();

/** A sandbox's processes: running ones, and ended ones until their last follower has seen the end. */
export class ProcessTable {
  private readonly byPid = new Map<number, ManagedProcess>();

  add(p: ManagedProcess): void {
    this.byPid.set(p.pid, p);
    void p.ended.then(() => {
      // Kept a moment, so a client that reconnects right after the end still learns of it.
      setTimeout(() => {
        if (this.byPid.get(p.pid) === p) this.byPid.delete(p.pid);
      }, 5_000).unref();
    });
  }

  /** The running process with this pid or tag; SERVER_NOT_FOUND otherwise. */
  find(selector: { pid?: number | undefined; tag?: string | undefined }, what: string): ManagedProcess {
    const p =
      selector.pid !== undefined ? this.byPid.get(selector.pid) : [...this.byPid.values()].find((x) => selector.tag !== undefined && x.tag === selector.tag && x.running);
    if (!p || !p.running) {
      const name = selector.pid !== undefined ? `pid ${selector.pid}` : `tag ${JSON.stringify(selector.tag)}`;
      throw new ServerError("SERVER_NOT_FOUND", `${what}: no running process with ${name} in this sandbox`, { hint: "list the sandbox's processes; it may have ended" });
    }
    return p;
  }

  running(): ManagedProcess[] {
    return [...this.byPid.values()].filter((p) => p.running);
  }
}
