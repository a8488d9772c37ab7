/**
 * Cross-process locks for the on-disk stores. A lock is a small file created with O_EXCL (so
 * taking it is atomic) that records its owner: pid, the host's boot id, the process's start time
 * (so that a reused pid is not mistaken for the owner), the host name and the pid namespace.
 *
 * Whoever finds the lock taken judges its owner at once:
 * - same host and pid namespace: the owner is gone when the host rebooted since (another boot
 *   id), when its pid is not running, or when that pid now belongs to a process started at
 *   another time. A gone owner's lock is taken over immediately (no staleness timeout);
 * - another host or pid namespace (a shared home directory): its pid cannot be checked, so the
 *   holder refreshes the file's mtime every few seconds and a lock not refreshed for
 *   LOCK_STALE_MS is taken over.
 *
 * Taking over is itself serialized by a second lock (`<lock>.break`), and only removes the very
 * lock file that was judged (same inode and nonce), so two waiters that both see a dead owner
 * cannot remove each other's fresh lock. A live owner is waited for, with `onWait` told who it is.
 *
 * Locks left by earlier versions (proper-lockfile: an empty directory refreshed every 5 s) are
 * honoured by their mtime.
 */
import { randomBytes } from "node:crypto";
import { closeSync, lstatSync, openSync, readFileSync, readlinkSync, rmdirSync, unlinkSync, writeSync, utimesSync } from "node:fs";
import { hostname } from "node:os";
import { StoreError } from "../errors.js";
import { logger } from "../debug.js";
import { pidAlive } from "../process.js";

const log = logger("store");

/** A lock whose owner cannot be checked (another host) and whose mtime is older than this is stale. */
export const LOCK_STALE_MS = 30_000;
/** How often a holder refreshes its lock's mtime (for owners on other hosts). */
const HEARTBEAT_MS = 5_000;
/** A lock file without a readable owner record, older than this, was left by a process killed while creating it. */
const UNREADABLE_GRACE_MS = 1_000;
const POLL_MIN_MS = 10;
const POLL_MAX_MS = 200;

/** Who holds a lock, as its file records it. */
export interface LockOwner {
  pid: number;
  /** /proc/sys/kernel/random/boot_id of the owner's host. */
  boot: string;
  /** The owner's start time (field 22 of /proc/<pid>/stat: clock ticks since boot). */
  start: string;
  host: string;
  /** The owner's pid namespace (/proc/self/ns/pid), so pids are only compared within one. */
  pidns: string;
  /** ISO time the lock was taken. */
  since: string;
  /** What the lock protects ("snapshot /path", "image ..."). */
  what: string;
  /** Random: tells this lock file from a later one at the same path. */
  nonce: string;
}

/** What a waiter is told about the lock it waits for. */
export interface LockWait {
  lockPath: string;
  what: string;
  /** The owner, when its record is readable (undefined for an old-style lock directory). */
  holder: LockOwner | undefined;
}

export interface AcquireOptions {
  /** Names the protected entry in errors, logs and the owner record. */
  what: string;
  /** Give up after this long (default 10 minutes) with STORE_LOCK_TIMEOUT. */
  timeoutMs?: number;
  /** Called when waiting for a live owner starts, and again whenever another process holds it. */
  onWait?: (w: LockWait) => void;
  signal?: AbortSignal;
}

/** The holder as progress events show it. */
export function holderInfo(w: LockWait): { pid: number; host: string; since: string; lock: string } | undefined {
  return w.holder ? { pid: w.holder.pid, host: w.holder.host, since: w.holder.since, lock: w.lockPath } : undefined;
}

export interface LockHandle {
  readonly path: string;
  /** Removes the lock if it is still this one. Idempotent. */
  release(): Promise<void>;
}

export const DEFAULT_LOCK_TIMEOUT_MS = 10 * 60_000;

// ---- this process -------------------------------------------------------------------------------

interface Identity {
  pid: number;
  boot: string;
  start: string;
  host: string;
  pidns: string;
}

let self: Identity | undefined;
function identity(): Identity {
  if (self && self.pid === process.pid) return self;
  self = { pid: process.pid, boot: bootId(), start: processStart("self") ?? "", host: hostname(), pidns: pidNamespace() };
  return self;
}

function bootId(): string {
  try {
    return readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim();
  } catch {
    return "";
  }
}

function pidNamespace(): string {
  try {
    return readlinkSync("/proc/self/ns/pid");
  } catch {
    return "";
  }
}

/** The start time of a process (clock ticks after boot), or undefined when it does not exist. */
export function processStart(pid: number | "self"): string | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return undefined;
  }
  // "pid (comm) state ppid ...": comm may hold spaces and parentheses; fields resume after the last ")".
  const fields = text.slice(text.lastIndexOf(")") + 2).split(" ");
  return fields[19]; // field 22 overall; fields[0] is field 3 (state)
}

// ---- judging a lock ------------------------------------------------------------------------------

interface Seen {
  ino: number;
  mtimeMs: number;
  /** An old-style lock: a directory (proper-lockfile). */
  legacy: boolean;
  owner: LockOwner | undefined;
}

/** The lock at `path` as it is now, or undefined when there is none. */
function inspect(path: string): Seen | undefined {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return undefined;
  }
  if (st.isDirectory()) return { ino: st.ino, mtimeMs: st.mtimeMs, legacy: true, owner: undefined };
  let owner: LockOwner | undefined;
  try {
    owner = parseOwner(readFileSync(path, "utf8"));
  } catch {
    /* vanished or unreadable: judged by its age below */
  }
  return { ino: st.ino, mtimeMs: st.mtimeMs, legacy: false, owner };
}

function parseOwner(text: string): LockOwner | undefined {
  try {
    const o = JSON.parse(text) as Partial<LockOwner>;
    if (typeof o.pid !== "number" || !Number.isInteger(o.pid) || o.pid <= 0 || typeof o.nonce !== "string") return undefined;
    return {
      pid: o.pid,
      boot: String(o.boot ?? ""),
      start: String(o.start ?? ""),
      host: String(o.host ?? ""),
      pidns: String(o.pidns ?? ""),
      since: String(o.since ?? ""),
      what: String(o.what ?? ""),
      nonce: o.nonce,
    };
  } catch {
    return undefined;
  }
}

/** Why the lock's owner is gone, or undefined while it may be alive. */
export function staleReason(seen: Seen, now = Date.now()): string | undefined {
  const age = now - seen.mtimeMs;
  if (seen.legacy) return age > LOCK_STALE_MS ? `an old-style lock not refreshed for ${Math.round(age / 1000)} s` : undefined;
  const o = seen.owner;
  if (!o) return age > UNREADABLE_GRACE_MS ? "it records no owner (its writer died while taking it)" : undefined;
  const me = identity();
  if (o.host === me.host && o.boot !== me.boot && me.boot !== "") return `its owner (pid ${o.pid}) ran before the host rebooted`;
  if (o.host === me.host && o.pidns === me.pidns && me.pidns !== "") {
    if (o.pid === me.pid && o.start === me.start) return undefined; // ours (another call in this process)
    if (!pidAlive(o.pid)) return `its owner (pid ${o.pid}) has exited`;
    const start = processStart(o.pid);
    if (start !== undefined && o.start !== "" && start !== o.start) return `its owner (pid ${o.pid}) has exited and the pid belongs to another process now`;
    return undefined;
  }
  // Another host or pid namespace: only the heartbeat tells.
  return age > LOCK_STALE_MS ? `its owner (pid ${o.pid} on ${o.host}) has not refreshed it for ${Math.round(age / 1000)} s` : undefined;
}

/** The holder of the lock at `path` when it is held by a live owner; undefined when free or stale. */
export function liveHolder(path: string): { owner: LockOwner | undefined } | undefined {
  const seen = inspect(path);
  if (!seen || staleReason(seen) !== undefined) return undefined;
  return { owner: seen.owner };
}

// ---- taking and releasing --------------------------------------------------------------------

/** Creates the lock file atomically; false when it exists. Throws on any other failure (ENOSPC: nothing left behind). */
function create(path: string, what: string): LockOwner | false {
  const me = identity();
  const owner: LockOwner = { ...me, since: new Date().toISOString(), what, nonce: randomBytes(8).toString("hex") };
  let fd: number;
  try {
    fd = openSync(path, "wx", 0o600);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST") return false;
    throw err;
  }
  try {
    writeSync(fd, JSON.stringify(owner) + "\n");
  } catch (err) {
    closeSync(fd);
    unlinkSync(path);
    throw err;
  }
  closeSync(fd);
  return owner;
}

/** Removes the lock at `path` if it is still the one `seen` describes (same inode and nonce). */
function removeIfSame(path: string, seen: Pick<Seen, "ino" | "legacy" | "owner">): boolean {
  const now = inspect(path);
  if (!now || now.ino !== seen.ino || now.legacy !== seen.legacy || now.owner?.nonce !== seen.owner?.nonce) return false;
  try {
    if (now.legacy) rmdirSync(path);
    else unlinkSync(path);
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return false;
    if (code === "ENOTEMPTY" || code === "EEXIST") {
      // An old-style lock directory with content: not one we understand; leave it.
      return false;
    }
    throw err;
  }
}

/** Removes the lock at `path` if it is the one `owner` took (its nonce). */
function removeOwned(path: string, owner: LockOwner): boolean {
  const now = inspect(path);
  return now !== undefined && now.owner?.nonce === owner.nonce && removeIfSame(path, now);
}

/**
 * Takes over a lock judged stale. Serialized by `<path>.break`: only one waiter removes it, and
 * only if it is still the lock judged. Resolves once the stale lock is gone or someone else
 * handled it.
 */
function breakStale(path: string, seen: Seen, reason: string, what: string): void {
  const brk = `${path}.break`;
  let mine: LockOwner | false;
  try {
    mine = create(brk, `taking over ${path}`);
  } catch (err) {
    throw noSpaceOr(err, path, what);
  }
  if (mine === false) {
    // Someone else is taking it over right now, or died doing so (then its break lock is stale too).
    const b = inspect(brk);
    const r = b ? staleReason(b) : undefined;
    if (b && r) {
      log("removing %s: %s", brk, r);
      removeIfSame(brk, b);
    }
    return;
  }
  try {
    if (removeIfSame(path, seen)) log("took over lock %s (%s): %s", path, seen.owner?.what ?? what, reason);
  } finally {
    removeOwned(brk, mine);
  }
}

/**
 * Takes the lock at `lockPath`, waiting while a live owner holds it and taking it over at once
 * from an owner that is gone. Rejects with STORE_LOCK_TIMEOUT after `timeoutMs`, with
 * `signal.reason` when aborted, and with STORE_NO_SPACE when the lock cannot even be written.
 */
export async function acquireLock(lockPath: string, opts: AcquireOptions): Promise<LockHandle> {
  const timeoutMs = opts.timeoutMs ?? DEFAULT_LOCK_TIMEOUT_MS;
  const deadline = Date.now() + timeoutMs;
  let delay = POLL_MIN_MS;
  let told: string | undefined;
  let last: LockOwner | undefined;
  for (;;) {
    opts.signal?.throwIfAborted();
    const handle = tryAcquire(lockPath, opts.what);
    if (handle) {
      if (told !== undefined) log("got lock %s for %s", lockPath, opts.what);
      return handle;
    }
    const seen = inspect(lockPath);
    if (seen) {
      last = seen.owner;
      // Told again only when another process holds it (not for each turn within one process).
      const id = seen.owner ? `${seen.owner.host}:${seen.owner.pid}:${seen.owner.start}` : seen.legacy ? `legacy-${seen.ino}` : "unknown";
      if (told !== id) {
        told = id;
        log("waiting for %s (lock %s held by %s)", opts.what, lockPath, seen.owner ? `pid ${seen.owner.pid} since ${seen.owner.since}` : "an unknown owner");
        opts.onWait?.({ lockPath, what: opts.what, holder: seen.owner });
      }
    }
    const left = deadline - Date.now();
    if (left <= 0) {
      const by = last ? `, held by pid ${last.pid}${last.host && last.host !== identity().host ? ` on ${last.host}` : ""} since ${last.since}` : "";
      throw new StoreError("STORE_LOCK_TIMEOUT", `timed out after ${formatMs(timeoutMs)} waiting for another process to finish writing ${opts.what} (lock ${lockPath}${by})`, {
        hint: `if no other supermachine process is running, remove ${lockPath}`,
      });
    }
    await sleep(Math.min(delay, left), opts.signal);
    delay = Math.min(delay * 2, POLL_MAX_MS);
  }
}

/**
 * One attempt: takes the lock if it is free or its owner is gone; undefined while a live owner
 * holds it.
 */
export function tryAcquire(lockPath: string, what: string): LockHandle | undefined {
  for (let attempt = 0; attempt < 3; attempt++) {
    let owner: LockOwner | false;
    try {
      owner = create(lockPath, what);
    } catch (err) {
      throw noSpaceOr(err, lockPath, what);
    }
    if (owner) return holding(lockPath, owner);
    const seen = inspect(lockPath);
    if (!seen) continue; // released meanwhile: try again
    const reason = staleReason(seen);
    if (reason === undefined) return undefined;
    breakStale(lockPath, seen, reason, what);
  }
  return undefined;
}

function holding(path: string, owner: LockOwner): LockHandle {
  const timer = setInterval(() => {
    try {
      const t = new Date();
      utimesSync(path, t, t);
    } catch (err) {
      log("refreshing lock %s: %s", path, (err as Error).message);
    }
  }, HEARTBEAT_MS);
  timer.unref();
  let released = false;
  return {
    path,
    release: async () => {
      if (released) return;
      released = true;
      clearInterval(timer);
      try {
        if (!removeOwned(path, owner)) log("lock %s was taken over meanwhile; leaving it", path);
      } catch (err) {
        log("releasing lock %s: %s", path, (err as Error).message);
      }
    },
  };
}

/** ENOSPC/EDQUOT as a StoreError naming the path; anything else unchanged. */
function noSpaceOr(err: unknown, path: string, what: string): unknown {
  const code = (err as NodeJS.ErrnoException).code;
  if (code === "ENOSPC" || code === "EDQUOT") {
    return new StoreError("STORE_NO_SPACE", `no space left on the file system of ${path} to take the lock for ${what}`, {
      cause: err,
      hint: "free some disk space (supermachine gc removes unused snapshots and images) or point SUPERMACHINE_HOME at a larger file system",
    });
  }
  return err;
}

function formatMs(ms: number): string {
  return ms < 10_000 ? `${ms} ms` : ms < 120_000 ? `${Math.round(ms / 1000)} s` : `${Math.round(ms / 60_000)} min`;
}

/** Resolves after `ms`; rejects with `signal.reason` if the signal aborts first. */
function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
