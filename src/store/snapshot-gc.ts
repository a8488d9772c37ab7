/**
 * Garbage collection of baked snapshots: which snapshot directories may go, and removing them
 * safely. What is still referenced is the caller's to say (src/build/gc.ts keys the projects);
 * this module only knows the store's rules:
 *
 * - only supermachine snapshots are considered: a directory with a `meta.json` of the current
 *   format. Anything else in a snapshots directory is left alone, as are temps of a bake in
 *   progress (`*.tmp-*`), locks (`*.lock`) and lease directories (`*.leases`);
 * - a snapshot a live process holds a lease on (a pool restores from it) is kept, and so is one
 *   whose publish lock is held (being rebaked right now);
 * - a project snapshot is `<name>-<key[0:16]>` with a module in its sources; anything else with
 *   valid metadata (`Image.build`'s `img-<key>` or its `name`, a `vm.snapshot` capture) is removed
 *   only when asked for (`all`), since nothing records who uses it.
 *
 * Removal renames the directory to a temp name first (`<name>.tmp-<hex>`, what a crashed
 * writer's leftovers look like, so the next publisher of that entry sweeps it up if we crash),
 * then deletes it: a reader sees the whole snapshot or none.
 */
import { randomBytes } from "node:crypto";
import { lstatSync } from "node:fs";
import { readdir, rename, rm } from "node:fs/promises";
import { basename, join } from "node:path";
import { logger } from "../debug.js";
import { snapshotInUse } from "./leases.js";
import { tryAcquire } from "./lock.js";
import { diskUsage, readSnapshotMeta, type SnapshotMeta } from "./snapshots.js";

const log = logger("gc");

export type KeepReason =
  /** The current key of an image of a project gc knows. */
  | "referenced"
  /** A live process holds a lease on it (a pool restores from it). */
  | "in-use"
  /** Its publish lock is held: it is being written. */
  | "being-written"
  /** Created after the `olderThan` cutoff. */
  | "recent"
  /** Not a project snapshot (Image.build, vm.snapshot): removed only with `all`. */
  | "not-a-project-snapshot"
  /** No project to judge it by (gc outside a project, without all-configs). */
  | "no-project"
  /** In the snapshots directory of a registered project that cannot be loaded (it may use it). */
  | "unreadable-project";

export interface SnapshotEntry {
  dir: string;
  /** The image name its sources record (Image.build: its `name`, default "image"). */
  name: string;
  key: string;
  created: string;
  bytes: number;
  /** Made by a project build (`<name>-<key[0:16]>`, with a module). */
  project: boolean;
}

export interface SnapshotGcResult {
  removed: SnapshotEntry[];
  kept: (SnapshotEntry & { reason: KeepReason })[];
  bytesFreed: number;
}

export interface SnapshotGcOptions {
  /** Directories holding snapshots (each scanned once). */
  dirs: string[];
  /**
   * Whether a project snapshot is still needed; undefined when no project says (it is kept).
   * Called only for project snapshots.
   */
  isReferenced?: (entry: SnapshotEntry, meta: SnapshotMeta) => boolean;
  /** Directories whose project snapshots are all kept (a project that uses them cannot be judged). */
  protectedDirs?: ReadonlySet<string>;
  /** Remove only snapshots created before this time (ms since the epoch). */
  createdBefore?: number;
  /** Also remove snapshots made outside any project (Image.build, captures). */
  all?: boolean;
  dryRun?: boolean;
}

/** Whether a snapshot directory is one a project build made. */
export function isProjectSnapshot(dirName: string, meta: SnapshotMeta): boolean {
  const s = meta.sources;
  return !!s && typeof s.module === "string" && /^[0-9a-f]{64}$/.test(meta.hash) && dirName === `${s.name}-${meta.hash.slice(0, 16)}`;
}

/** Lists what may go and removes it (unless `dryRun`). */
export async function collectSnapshots(opts: SnapshotGcOptions): Promise<SnapshotGcResult> {
  const result: SnapshotGcResult = { removed: [], kept: [], bytesFreed: 0 };
  for (const dir of new Set(opts.dirs)) {
    let names: string[];
    try {
      names = await readdir(dir);
    } catch {
      continue; // no snapshots there yet
    }
    for (const name of names.sort()) {
      if (name.includes(".tmp-") || name.endsWith(".lock") || name.endsWith(".leases")) continue;
      const path = join(dir, name);
      try {
        if (!lstatSync(path).isDirectory()) continue;
      } catch {
        continue;
      }
      const meta = await readSnapshotMeta(path);
      if (!meta) continue; // not ours (or an older format we cannot judge): never touched
      const project = isProjectSnapshot(name, meta);
      const entry: SnapshotEntry = { dir: path, name: meta.sources?.name ?? name, key: meta.hash, created: meta.created, bytes: await diskUsage(path), project };
      const keep = (reason: KeepReason) => result.kept.push({ ...entry, reason });
      if (project) {
        if (opts.protectedDirs?.has(dir)) {
          keep("unreadable-project");
          continue;
        }
        if (!opts.isReferenced) {
          keep("no-project");
          continue;
        }
        if (opts.isReferenced(entry, meta)) {
          keep("referenced");
          continue;
        }
      } else if (!opts.all) {
        keep("not-a-project-snapshot");
        continue;
      }
      if (opts.createdBefore !== undefined && !(Date.parse(meta.created) < opts.createdBefore)) {
        keep("recent");
        continue;
      }
      if (snapshotInUse(path)) {
        keep("in-use");
        continue;
      }
      if (opts.dryRun) {
        result.removed.push(entry);
        result.bytesFreed += entry.bytes;
        continue;
      }
      const removed = await removeSnapshot(path);
      if (removed === "removed") {
        result.removed.push(entry);
        result.bytesFreed += entry.bytes;
      } else keep(removed);
    }
  }
  return result;
}

/**
 * Removes one snapshot directory under its publish lock (the one a bake of the same key takes),
 * checking its lease again once the lock is held.
 */
async function removeSnapshot(path: string): Promise<"removed" | "in-use" | "being-written"> {
  const lock = tryAcquire(`${path}.lock`, `snapshot ${path} (gc)`);
  if (!lock) return "being-written";
  try {
    if (snapshotInUse(path)) return "in-use";
    const aside = join(path, "..", `${basename(path)}.tmp-${randomBytes(6).toString("hex")}`);
    await rename(path, aside);
    await rm(aside, { recursive: true, force: true });
    log("removed snapshot %s", path);
    return "removed";
  } finally {
    await lock.release();
  }
}
