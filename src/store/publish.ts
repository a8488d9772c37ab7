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
 * One lock policy for every store (store/lock.ts): a lock file (`<target>.lock` unless told)
 * that records its owner; a lock whose owner is gone (exited, pid reused, host rebooted) is taken
 * over at once, a live owner is waited for (`onWait` says who). Waiting longer than
 * `lockTimeoutMs` fails with STORE_LOCK_TIMEOUT.
 *
 * A write that fails because the file system is full (ENOSPC, or nearly no space left once it
 * failed) fails with STORE_NO_SPACE naming the entry and the path, and leaves nothing behind.
 */
import { randomBytes } from "node:crypto";
// statfs through the namespace: a named import of it fails the whole package at link time on
// runtimes without it (Bun 1.1, Deno 2.5), before src/js-runtime-check.ts can explain.
import * as fsp from "node:fs/promises";
import { lstat, mkdir, readdir, rename, rm } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { StoreError, SupermachineError } from "../errors.js";
import { logger } from "../debug.js";
import { PRIVATE_DIR_MODE, tightenTree } from "../private.js";
import { fsyncPath, fsyncTree } from "./durable.js";
import { acquireLock, DEFAULT_LOCK_TIMEOUT_MS, LOCK_STALE_MS, type LockWait } from "./lock.js";

export { DEFAULT_LOCK_TIMEOUT_MS, LOCK_STALE_MS, type LockWait };

const log = logger("store");

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
  /** Called when the lock is held by another writer and publish starts waiting (again if another process takes it meanwhile). */
  onWait?: (w: LockWait) => void;
  /** Give up waiting for the lock after this long (default 10 minutes). */
  lockTimeoutMs?: number;
  /** Aborting while waiting for the lock rejects with `signal.reason`; while writing, it is write()'s business. */
  signal?: AbortSignal;
  /**
   * Moves a damaged entry found at `target` out of the way (e.g. into a quarantine) instead of
   * deleting it; called with the lock held, just before the new entry is renamed into place.
   */
  moveAside?: (target: string) => Promise<void>;
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

  const lock = await acquireLock(lockPath, {
    what: req.what,
    ...(req.lockTimeoutMs !== undefined ? { timeoutMs: req.lockTimeoutMs } : {}),
    ...(req.onWait ? { onWait: req.onWait } : {}),
    ...(req.signal ? { signal: req.signal } : {}),
  });
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
      // Judged before the temp goes: once it is removed the file system has room again.
      const full = await noSpace(err, tmpDir);
      await rm(tmp, { recursive: true, force: true });
      if (full) {
        throw new StoreError("STORE_NO_SPACE", `no space left on the file system of ${tmpDir} while writing ${req.what} (${full})`, {
          cause: err,
          hint: "nothing was kept: free some space there (supermachine gc removes unused snapshots and images) or use a larger file system (SUPERMACHINE_HOME, snapshotsDir), then run again",
        });
      }
      throw err;
    }
    await fsyncPath(parent);
    log("published %s at %s", req.what, req.target);
    return { value, created: true };
  } finally {
    await lock.release();
  }
}

/** Below this much free space, a failed write is taken for a full file system. */
const NEARLY_FULL_BYTES = 4 * 1024 * 1024;

/**
 * Whether `err` (or its causes) is a full file system: ENOSPC/EDQUOT anywhere in it, or a failure
 * (a tool's exit, a VM killed by SIGBUS on its memory file) with almost no space left at `dir`.
 * Returns what was seen, or undefined.
 */
async function noSpace(err: unknown, dir: string): Promise<string | undefined> {
  for (let e = err, depth = 0; e && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "ENOSPC" || code === "EDQUOT") return code;
    if (e instanceof SupermachineError && e.code === "STORE_NO_SPACE") return "ENOSPC";
    if (/no space left on device/i.test((e as Error).message ?? "")) return "ENOSPC";
  }
  try {
    const fs = await fsp.statfs(dir);
    const free = fs.bavail * fs.bsize;
    if (free < NEARLY_FULL_BYTES) return `${Math.round(free / 1024)} KiB free`;
  } catch {
    /* cannot tell */
  }
  return undefined;
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
  if (existing && req.moveAside) {
    log("moving damaged %s at %s aside", req.what, req.target);
    await req.moveAside(req.target);
  } else if (existing && (req.kind === "dir" || existing.isDirectory())) {
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
