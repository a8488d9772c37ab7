/**
 * Quarantine: a damaged store entry (a snapshot whose RAM no longer matches its checksums, a root
 * filesystem or a blob that does not hash to what it should) is never used again but is kept for
 * inspection for a while: it is renamed into a `.quarantine` directory beside it (same file
 * system: an atomic rename), with a `QUARANTINED.json` saying where it came from, when and why.
 * Entries older than QUARANTINE_TTL_MS, and beyond the newest QUARANTINE_KEEP, are removed
 * whenever something is quarantined there (and by `supermachine verify`).
 */
import { randomBytes } from "node:crypto";
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { logger } from "../debug.js";
import { fsyncPath } from "./durable.js";
import { acquireLock } from "./lock.js";

const log = logger("store");

export const QUARANTINE_DIR = ".quarantine";
export const QUARANTINE_TTL_MS = 7 * 24 * 3600_000;
export const QUARANTINE_KEEP = 8;
const NOTE = "QUARANTINED.json";

export interface QuarantineNote {
  from: string;
  reason: string;
  at: string;
}

/** The quarantine directory for entries of `parent` (a snapshots directory, the images store, ...). */
export const quarantineDirOf = (entry: string): string => join(dirname(entry), QUARANTINE_DIR);

/**
 * Moves `entry` (a file or a directory) into its quarantine and returns its new path. The caller
 * makes sure nobody writes the entry meanwhile (holds its lock, or knows it is not in use).
 */
export async function quarantine(entry: string, reason: string, qdir = quarantineDirOf(entry)): Promise<string> {
  await mkdir(qdir, { recursive: true, mode: 0o700 });
  const stamp = new Date().toISOString().replace(/[:.]/g, "-");
  const dest = join(qdir, `${basename(entry)}-${stamp}-${randomBytes(2).toString("hex")}`);
  const isDir = (await stat(entry)).isDirectory();
  await rename(entry, dest);
  const note: QuarantineNote = { from: entry, reason, at: new Date().toISOString() };
  // A directory keeps its note inside; a file gets one beside it.
  await writeFile(isDir ? join(dest, NOTE) : `${dest}.${NOTE}`, JSON.stringify(note, null, 2) + "\n").catch((err: Error) => log("writing the quarantine note of %s: %s", dest, err.message));
  await fsyncPath(dirname(entry)).catch(() => {});
  log("quarantined %s at %s: %s", entry, dest, reason);
  await pruneQuarantine(qdir).catch((err: Error) => log("pruning %s: %s", qdir, err.message));
  return dest;
}

/**
 * Quarantines the entry at `entry` under its publish lock (`<entry>.lock` unless told), provided `stillBad`
 * (called with the lock held) confirms it is the damaged one judged before, not a good entry
 * another process published meanwhile. Resolves the new path, or undefined when it was not moved.
 */
export async function quarantineLocked(entry: string, reason: string, stillBad: () => Promise<boolean>, opts: { lockPath?: string; qdir?: string } = {}): Promise<string | undefined> {
  const qdir = opts.qdir;
  const lock = await acquireLock(opts.lockPath ?? `${entry}.lock`, { what: `${entry} (to quarantine it)` });
  try {
    if (!(await stat(entry).then(() => true, () => false))) return undefined;
    if (!(await stillBad())) return undefined;
    return await quarantine(entry, reason, qdir);
  } finally {
    await lock.release();
  }
}

export interface QuarantinedEntry {
  path: string;
  note: QuarantineNote | undefined;
}

/** What a quarantine directory holds, newest first. */
export async function listQuarantine(qdir: string): Promise<QuarantinedEntry[]> {
  let names: string[];
  try {
    names = await readdir(qdir);
  } catch {
    return [];
  }
  const out: (QuarantinedEntry & { t: number })[] = [];
  for (const n of names) {
    if (n.endsWith(`.${NOTE}`)) continue;
    const path = join(qdir, n);
    const st = await stat(path).catch(() => undefined);
    if (!st) continue;
    const notePath = st.isDirectory() ? join(path, NOTE) : `${path}.${NOTE}`;
    const note = await readFile(notePath, "utf8").then((t) => JSON.parse(t) as QuarantineNote, () => undefined);
    const t = note ? Date.parse(note.at) : st.mtimeMs;
    out.push({ path, note, t: Number.isNaN(t) ? st.mtimeMs : t });
  }
  return out.sort((a, b) => b.t - a.t).map(({ t: _t, ...e }) => e);
}

/** Removes quarantined entries older than the TTL and beyond the newest QUARANTINE_KEEP. */
export async function pruneQuarantine(qdir: string, now = Date.now()): Promise<number> {
  const entries = await listQuarantine(qdir);
  let removed = 0;
  for (const [i, e] of entries.entries()) {
    // When it was quarantined: its note says; without one (lost), its own mtime.
    const at = e.note ? Date.parse(e.note.at) : ((await stat(e.path).catch(() => undefined))?.mtimeMs ?? NaN);
    if (i < QUARANTINE_KEEP && !(now - at > QUARANTINE_TTL_MS)) continue;
    await rm(e.path, { recursive: true, force: true });
    await rm(`${e.path}.${NOTE}`, { force: true });
    removed++;
    log("removed %s from quarantine", e.path);
  }
  return removed;
}
