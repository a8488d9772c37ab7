/**
 * Publishing one entry of an on-disk store (an image's root filesystem, a blob, a ref, a
 * snapshot) so that readers only ever see complete entries and concurrent writers, in this
 * process or others, write it once:
 *
 *   check (no lock) → lock → check again → remove temps of crashed writers of this entry →
 *   write a fresh temp next to the target → fsync it → move a damaged target aside → rename →
 *   fsync the parent directory → unlock
 *
 * Crash safety: the target only ever appears by renaming a complete, fsynced temp, so a crash
 * at any point leaves either the old state or the new entry, plus temps (and maybe a lock) that
 * the next publisher of the entry removes (or, for a lock, takes over once it is stale).
 *
 * One lock policy for every store: a proper-lockfile lock (a directory, `<target>.lock` unless
 * told) whose holder refreshes its mtime every 5 s; one not refreshed for 30 s belongs to a dead
 * process and is taken over. Waiting longer than `lockTimeoutMs` fails with STORE_LOCK_TIMEOUT.
 */
import { randomBytes } from "node:crypto";
import { lstat, mkdir, readdir, rename, rm } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import lockfile from "proper-lockfile";
import { StoreError } from "../errors.js";
import { logger } from "../log.js";
import { PRIVATE_DIR_MODE, tightenTree } from "../private.js";
import { fsyncPath, fsyncTree } from "./durable.js";

const log = logger("store");

/** A lock whose mtime is older than this is stale (its holder died) and is taken over. */
export const LOCK_STALE_MS = 30_000;
/** How often a holder refreshes its lock's mtime. */
const LOCK_UPDATE_MS = 5_000;
/** Default for `PublishRequest.lockTimeoutMs`. */
export const DEFAULT_LOCK_TIMEOUT_MS = 10 * 60_000;
const POLL_MIN_MS = 25;
const POLL_MAX_MS = 1_000;

export interface PublishRequest<T> {
  /** Final path (file or directory). */
  target: string;
  kind: "file" | "dir";
  /** Names the entry in errors and logs, e.g. "snapshot img-abc". */
  what: string;
  /** The valid entry at `target`, or undefined (absent or damaged). Should not throw for a damaged entry. */
  check: () => Promise<T | undefined>;
  /**
   * Fills `tmp` and returns the value: for "dir", `tmp` is an existing empty directory; for
   * "file", a path to create.
   */
  write: (tmp: string) => Promise<T>;
  /** Default `${target}.lock`. */
  lockPath?: string;
  /** Where temps go; default: next to target. Must be on the target's file system. */
  tmpDir?: string;
  /** Temps are `<tmpPrefix><random hex>` in `tmpDir`; default `<basename(target)>.tmp-`. */
  tmpPrefix?: string;
  /**
   * `write` fsyncs the files it writes itself: publish then syncs only the temp directory (for
   * "dir") or nothing more (for "file"). Default false: publish fsyncs the temp file, or every
   * file and directory under the temp directory.
   */
  synced?: boolean;
  /** Called once when the lock is held by another writer and publish starts waiting. */
  onWait?: () => void;
  /** Give up waiting for the lock after this long (default 10 minutes). */
  lockTimeoutMs?: number;
  /** Aborting while waiting for the lock rejects with `signal.reason`; while writing, it is write()'s business. */
  signal?: AbortSignal;
}

/**
 * Returns the valid entry at `req.target`, writing it first if there is none. `created` is
 * true when this call wrote it.
 */
export async function publish<T>(req: PublishRequest<T>): Promise<{ value: T; created: boolean }> {
  const found = await req.check();
  if (found !== undefined) return { value: found, created: false };

  const lockPath = req.lockPath ?? `${req.target}.lock`;
  const parent = dirname(req.target);
  const tmpDir = req.tmpDir ?? parent;
  const prefix = req.tmpPrefix ?? `${basename(req.target)}.tmp-`;
  for (const d of new Set([parent, tmpDir, dirname(lockPath)])) await mkdir(d, { recursive: true, mode: PRIVATE_DIR_MODE });

  const release = await acquireLock(req, lockPath);
  try {
    const raced = await req.check();
    if (raced !== undefined) return { value: raced, created: false };
    await removeTemps(tmpDir, prefix);

    const tmp = join(tmpDir, tempName(prefix));
    let value: T;
    try {
      if (req.kind === "dir") await mkdir(tmp);
      value = await req.write(tmp);
      // Entries are private to their owner (QEMU's group keeps what it was granted): src/private.ts.
      tightenTree(tmp);
      if (req.kind === "file") {
        if (!req.synced) await fsyncPath(tmp);
      } else if (req.synced) await fsyncPath(tmp);
      else await fsyncTree(tmp);
      const other = await install(tmp, req, tmpDir, prefix);
      if (other !== undefined) {
        await rm(tmp, { recursive: true, force: true });
        return { value: other, created: false };
      }
    } catch (err) {
      await rm(tmp, { recursive: true, force: true });
      throw err;
    }
    await fsyncPath(parent);
    log("published %s at %s", req.what, req.target);
    return { value, created: true };
  } finally {
    await release();
  }
}

/**
 * Renames the complete temp to the target. A file replaces a damaged one atomically; anything
 * rename cannot replace (a directory) is moved aside first, then removed. Returns the entry of
 * another writer that won a race (only possible if our lock was taken over as stale); the
 * caller then removes `tmp`.
 */
async function install<T>(tmp: string, req: PublishRequest<T>, tmpDir: string, prefix: string): Promise<T | undefined> {
  const existing = await lstat(req.target).catch(() => undefined);
  let aside: string | undefined;
  if (existing && (req.kind === "dir" || existing.isDirectory())) {
    aside = join(tmpDir, tempName(prefix)); // a temp name: a crash before the rm below leaves a temp
    log("replacing damaged %s at %s", req.what, req.target);
    await rename(req.target, aside);
  } else if (existing) {
    log("replacing damaged %s at %s", req.what, req.target);
  }
  try {
    await rename(tmp, req.target);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const other = code === "ENOTEMPTY" || code === "EEXIST" || code === "EISDIR" ? await req.check() : undefined;
    if (other === undefined) throw err;
    log("%s was published by another writer meanwhile", req.what);
    return other;
  } finally {
    if (aside) await rm(aside, { recursive: true, force: true });
  }
  return undefined;
}

/** Takes the lock, waiting (with `onWait`) while another writer holds it. Returns the release. */
async function acquireLock(req: PublishRequest<unknown>, lockPath: string): Promise<() => Promise<void>> {
  const timeoutMs = req.lockTimeoutMs ?? DEFAULT_LOCK_TIMEOUT_MS;
  const deadline = Date.now() + timeoutMs;
  let delay = POLL_MIN_MS;
  let waiting = false;
  for (;;) {
    req.signal?.throwIfAborted();
    let compromised: Error | undefined;
    try {
      const release = await lockfile.lock(req.target, {
        realpath: false,
        lockfilePath: lockPath,
        stale: LOCK_STALE_MS,
        update: LOCK_UPDATE_MS,
        // The default throws from a timer; a lost lock is only logged, since the final rename is
        // atomic and a conflicting entry is re-checked (see install).
        onCompromised: (err) => {
          compromised = err;
          log("lock %s for %s was compromised: %s", lockPath, req.what, err.message);
        },
      });
      if (waiting) log("got lock %s for %s", lockPath, req.what);
      // After a compromise the lock may be someone else's now: release() knows and leaves it.
      return () => release().catch((err: unknown) => log("releasing %s%s: %s", lockPath, compromised ? " (compromised)" : "", (err as Error).message));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ELOCKED") throw err;
    }
    if (!waiting) {
      waiting = true;
      log("waiting for another writer of %s (lock %s)", req.what, lockPath);
      req.onWait?.();
    }
    const left = deadline - Date.now();
    if (left <= 0) {
      throw new StoreError("STORE_LOCK_TIMEOUT", `timed out after ${formatMs(timeoutMs)} waiting for another process to finish writing ${req.what} (lock ${lockPath})`, {
        hint: `if no other supermachine process is running, remove ${lockPath}`,
      });
    }
    await sleep(Math.min(delay, left), req.signal);
    delay = Math.min(delay * 1.5, POLL_MAX_MS);
  }
}

/** Removes temps of this entry left by crashed writers; the caller holds the entry's lock. */
async function removeTemps(tmpDir: string, prefix: string): Promise<void> {
  // Exactly `<prefix><hex>`: the temps of another entry whose name extends ours do not match.
  const re = new RegExp(`^${prefix.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}[0-9a-f]+$`);
  for (const name of await readdir(tmpDir)) {
    if (!re.test(name)) continue;
    log("removing %s, left by a crashed writer", join(tmpDir, name));
    await rm(join(tmpDir, name), { recursive: true, force: true });
  }
}

const tempName = (prefix: string) => `${prefix}${randomBytes(6).toString("hex")}`;

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
