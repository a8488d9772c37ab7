/**
 * `supermachine verify`: checks every byte the caches hold against what was recorded when it was
 * written: each snapshot (meta.json's own checksum, the device state, every RAM chunk against
 * its checksum, its root filesystem), each image's root filesystem (against the sha256 its entry
 * recorded) and each blob of the blob store (against its digest). With `restore`, each snapshot
 * that checks out is also restored once in a VM (runtime/probe.ts): one QEMU refuses is damaged
 * too. With `fix`, damaged entries are
 * moved into their quarantine (kept for inspection, never used again; the next build bakes or
 * pulls them again). Quarantines are pruned on the way.
 */
import { createHash } from "node:crypto";
import { createReadStream, type Dirent } from "node:fs";
import { readdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { registeredProjects } from "../config/registry.js";
import { checkImageEntry } from "../store/images.js";
import { logger } from "../debug.js";
import { BlobStore } from "../store/blobs.js";
import { homePaths } from "../paths.js";
import { pruneQuarantine, QUARANTINE_DIR, quarantineDirOf, quarantineLocked } from "../store/quarantine.js";
import { META_VERSION, quarantineSnapshot, SNAPSHOT_FILES, verifySnapshot, type LoadedSnapshot } from "../store/snapshots.js";
import { quarantineFailingSnapshot } from "../store/restore-failures.js";
import { probeRestore } from "../runtime/probe.js";

const log = logger("verify");

export type VerifyStatus = "ok" | "damaged" | "unchecked";

export interface VerifyEntry {
  kind: "snapshot" | "image" | "blob";
  path: string;
  /** A snapshot's image name, an image's manifest digest, a blob's digest. */
  name: string;
  status: VerifyStatus;
  /** Why it is damaged, or why it could not be checked. */
  reason?: string;
  /** Where `fix` moved it. */
  quarantined?: string;
  /** A snapshot's test restore (`restore`): how long it took, or why it failed. */
  restore?: { ok: true; ms: number } | { ok: false; error: string; code: string | undefined };
}

export interface VerifyReport {
  snapshots: VerifyEntry[];
  images: VerifyEntry[];
  blobs: { checked: number; damaged: VerifyEntry[] };
  /** Damaged entries found, and how many of them `fix` moved into a quarantine. */
  damaged: number;
  fixed: number;
  /** The snapshots directories that were checked. */
  snapshotsDirs: string[];
  ms: number;
}

export interface VerifyOptions {
  /** Snapshots directories to check besides the default one and those of registered projects. */
  snapshotsDirs?: string[];
  /** Move damaged entries into their quarantine. */
  fix?: boolean;
  /** Also restore each snapshot that checks out in a VM (a snapshot QEMU refuses is damaged). */
  restore?: boolean;
  /** Deadline of one test restore (default 30 s). */
  restoreTimeoutMs?: number;
  home?: string;
  /** Each entry once checked (progress). */
  onEntry?: (e: VerifyEntry) => void;
}

export async function verifyCache(opts: VerifyOptions = {}): Promise<VerifyReport> {
  const t0 = performance.now();
  const paths = homePaths(opts.home);
  const dirs = new Set([paths.snapshots, ...(opts.snapshotsDirs ?? [])]);
  for (const p of await registeredProjects(opts.home).catch(() => [])) if (p.snapshotsDir) dirs.add(p.snapshotsDir);
  const report: VerifyReport = { snapshots: [], images: [], blobs: { checked: 0, damaged: [] }, damaged: 0, fixed: 0, snapshotsDirs: [...dirs], ms: 0 };
  const seen = (list: VerifyEntry[], e: VerifyEntry) => {
    list.push(e);
    if (e.status === "damaged") {
      report.damaged++;
      if (e.quarantined) report.fixed++;
    }
    opts.onEntry?.(e);
  };

  for (const dir of dirs) {
    for (const name of await entries(dir)) {
      if (!name.isDirectory() || skip(name.name)) continue;
      const path = join(dir, name.name);
      const meta = await snapshotHead(path);
      if (!meta) continue; // not a snapshot
      if (meta.version !== META_VERSION && meta.version !== undefined) {
        seen(report.snapshots, { kind: "snapshot", path, name: name.name, status: "unchecked", reason: `made by another version (format ${String(meta.version)}): rebaked when next used` });
        continue;
      }
      const v = await verifySnapshot(path);
      const e: VerifyEntry = { kind: "snapshot", path, name: meta.name ?? name.name, status: v.ok ? "ok" : "damaged", ...(v.ok ? {} : { reason: v.reason }) };
      if (!v.ok && opts.fix) {
        const q = await quarantineSnapshot(path, v.reason);
        if (q) e.quarantined = q;
      }
      if (v.ok && opts.restore) await testRestore(e, v.snapshot, opts);
      seen(report.snapshots, e);
    }
    await pruneQuarantine(join(dir, QUARANTINE_DIR)).catch(() => 0);
  }

  for (const name of await entries(paths.images)) {
    if (!name.isDirectory() || !/^[0-9a-f]{64}$/.test(name.name)) continue;
    const path = join(paths.images, name.name);
    const c = await checkImageEntry(path, { full: true });
    if (c.status === "missing") continue; // a directory without metadata: not an entry (yet)
    const e: VerifyEntry = { kind: "image", path, name: `sha256:${name.name}`, status: "ok" };
    if (c.status === "ok" && !c.checked) Object.assign(e, { status: "unchecked", reason: "made by an older version: its entry records no sha256" });
    if (c.status === "damaged" || c.status === "invalid") {
      Object.assign(e, { status: "damaged", reason: c.reason });
      if (opts.fix) {
        const q = await quarantineLocked(path, c.reason, async () => {
          const again = await checkImageEntry(path, { full: true });
          return again.status === "damaged" || again.status === "invalid";
        });
        if (q) e.quarantined = q;
      }
    }
    seen(report.images, e);
  }
  await pruneQuarantine(quarantineDirOf(join(paths.images, "x"))).catch(() => 0);

  const store = new BlobStore(paths.store);
  const blobs = await store.list().catch(() => [] as string[]);
  for (const digest of blobs) {
    const path = store.path(digest);
    const actual = await sha256File(path).catch(() => undefined);
    report.blobs.checked++;
    if (actual === digest.slice("sha256:".length)) continue;
    const reason = actual === undefined ? "it cannot be read" : `its content hashes to sha256:${actual}`;
    const e: VerifyEntry = { kind: "blob", path, name: digest, status: "damaged", reason };
    if (opts.fix) {
      const q = await quarantineLocked(path, reason, async () => (await sha256File(path).catch(() => undefined)) !== digest.slice(7), {
        lockPath: join(paths.store, "locks", `${digest.slice(7)}.lock`),
        qdir: join(paths.store, QUARANTINE_DIR),
      });
      if (q) e.quarantined = q;
    }
    seen(report.blobs.damaged, e);
  }
  await pruneQuarantine(join(paths.store, QUARANTINE_DIR)).catch(() => 0);

  report.ms = Math.round(performance.now() - t0);
  log("verified %d snapshots, %d images, %d blobs in %d ms: %d damaged, %d quarantined", report.snapshots.length, report.images.length, report.blobs.checked, report.ms, report.damaged, report.fixed);
  return report;
}

/** Restores the snapshot of `e` once; a restore QEMU refuses makes it damaged (quarantined with `fix`). */
async function testRestore(e: VerifyEntry, snap: LoadedSnapshot, opts: VerifyOptions): Promise<void> {
  const r = await probeRestore(snap, { timeoutMs: opts.restoreTimeoutMs ?? 30_000 });
  if (r.ok) {
    e.restore = { ok: true, ms: r.ms };
    return;
  }
  const error = r.error.message.split("\n")[0]!;
  e.restore = { ok: false, error, code: (r.error as { code?: string }).code };
  log("test restore of %s failed (%s): %s", e.path, r.fault ? "the snapshot's fault" : "inconclusive", error);
  if (!r.fault) return;
  e.status = "damaged";
  e.reason = `its restore fails: ${error}`;
  if (opts.fix) {
    const q = await quarantineFailingSnapshot(e.path, snap.meta.checksum, e.reason);
    if (q) e.quarantined = q;
  }
}

/** Temps, locks, leases and quarantines beside the snapshots. */
const skip = (name: string) => name.startsWith(".") || name.includes(".tmp-") || name.endsWith(".lock") || name.endsWith(".break") || name.endsWith(".leases");

async function entries(dir: string): Promise<Dirent[]> {
  try {
    return (await readdir(dir, { withFileTypes: true })).sort((a, b) => a.name.localeCompare(b.name));
  } catch {
    return [];
  }
}

async function sha256File(path: string): Promise<string> {
  if (!(await stat(path)).isFile()) throw new Error("not a file");
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

/**
 * A snapshot directory's metadata version and name: undefined when it is no snapshot (no
 * meta.json, or one that is not supermachine's); `version: undefined` when its meta.json cannot
 * be parsed (a damaged snapshot: verifySnapshot says so).
 */
async function snapshotHead(dir: string): Promise<{ version: unknown; name: string | undefined } | undefined> {
  let text: string;
  try {
    text = await readFile(join(dir, SNAPSHOT_FILES.meta), "utf8");
  } catch {
    return undefined;
  }
  try {
    const m = JSON.parse(text) as { version?: unknown; hash?: unknown; sources?: { name?: unknown } };
    if (!m || typeof m !== "object" || typeof m.hash !== "string") return { version: undefined, name: undefined };
    return { version: m.version, name: typeof m.sources?.name === "string" ? m.sources.name : undefined };
  } catch {
    return { version: undefined, name: undefined };
  }
}
