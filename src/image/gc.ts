/**
 * Listing and removal of local images, and garbage collection of what no image uses: blobs in
 * the shared store and squashfs root filesystems (a root filesystem a snapshot was made on is in
 * use while the snapshot exists).
 *
 * A blob written in the last `graceMs` is never collected, so a pull that is still running
 * (its blobs are stored before its reference is recorded) cannot lose them to a concurrent gc.
 */
import { existsSync, readdirSync } from "node:fs";
import { readFile, rm, stat } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { logger } from "../debug.js";
import { homePaths } from "../paths.js";
import { BlobStore } from "../store/blobs.js";
import { isValidDigest } from "../oci/oci-layout.js";
import { parseImageRef } from "./reference.js";
import { listRefs, removeRef, type RefRecord } from "./local-names.js";
import { SNAPSHOT_FILES } from "../store/snapshots.js";
import { METADATA_FILE, ROOTFS_FILE } from "../store/images.js";

const log = logger("gc");

export interface ImageListing {
  ref: string;
  manifestDigest: string;
  source: RefRecord["source"];
  pulledAt: string;
  /** Bytes of the image's blobs (manifest, config, layers) in the store. */
  blobBytes: number;
  /** Bytes of its squashfs root filesystem, when it has been built. */
  rootfsBytes: number | undefined;
}

export interface GcResult {
  blobsRemoved: number;
  imagesRemoved: number;
  bytesFreed: number;
}

/** Digests a stored manifest or index refers to (config, layers, child manifests). */
async function children(store: BlobStore, digest: string): Promise<string[]> {
  let doc: { config?: { digest?: unknown }; layers?: { digest?: unknown }[]; manifests?: { digest?: unknown }[] };
  try {
    const buf = await readFile(store.path(digest));
    if (buf.length > 4 * 1024 * 1024) return [];
    doc = JSON.parse(buf.toString("utf8")) as typeof doc;
  } catch {
    return [];
  }
  const out: unknown[] = [doc.config?.digest, ...(doc.layers ?? []).map((l) => l.digest), ...(doc.manifests ?? []).map((m) => m.digest)];
  return out.filter(isValidDigest);
}

/** Every blob reachable from `roots` (only JSON-bearing blobs are opened). */
async function reachable(store: BlobStore, roots: string[]): Promise<Set<string>> {
  const seen = new Set<string>();
  const queue = [...roots];
  while (queue.length) {
    const d = queue.pop()!;
    if (seen.has(d)) continue;
    seen.add(d);
    const st = await stat(store.path(d)).catch(() => undefined);
    // Layers are large and not JSON; manifests and indexes are small. Open only small blobs.
    if (st && st.size <= 4 * 1024 * 1024) queue.push(...(await children(store, d)));
  }
  return seen;
}

async function size(path: string): Promise<number> {
  return (await stat(path).catch(() => undefined))?.size ?? 0;
}

export async function listImages(home?: string): Promise<ImageListing[]> {
  const store = BlobStore.open(home);
  const images = homePaths(home).images;
  const out: ImageListing[] = [];
  for (const rec of await listRefs(home)) {
    const blobs = await reachable(store, [rec.manifestDigest, ...(rec.indexDigest ? [rec.indexDigest] : [])]);
    let blobBytes = 0;
    for (const d of blobs) blobBytes += await size(store.path(d));
    const rootfs = join(images, rec.manifestDigest.slice(7), ROOTFS_FILE);
    out.push({
      ref: rec.ref,
      manifestDigest: rec.manifestDigest,
      source: rec.source,
      pulledAt: rec.pulledAt,
      blobBytes,
      rootfsBytes: existsSync(rootfs) ? await size(rootfs) : undefined,
    });
  }
  return out;
}

/**
 * Forgets the local name `ref` (as given, or its canonical form) and removes at once the blobs
 * and root filesystem that only it used. Resolves with what was removed.
 */
export async function removeImage(ref: string, home?: string): Promise<{ removed: string[] } & GcResult> {
  const parsed = parseImageRef(ref);
  const all = await listRefs(home);
  const gone = all.filter(
    (rec) =>
      rec.ref === ref ||
      (parsed.kind === "registry" && rec.ref === parsed.registry.canonical) ||
      (parsed.kind === "docker-archive" && rec.ref.startsWith(`docker-archive:${parsed.file}:${parsed.name ?? ""}@`)),
  );
  const result = { removed: [] as string[], blobsRemoved: 0, imagesRemoved: 0, bytesFreed: 0 };
  if (gone.length === 0) return result;
  for (const rec of gone) if (await removeRef(rec.ref, home)) result.removed.push(rec.ref);
  const store = BlobStore.open(home);
  const rootsOf = (rs: RefRecord[]) => rs.flatMap((r) => [r.manifestDigest, ...(r.indexDigest ? [r.indexDigest] : [])]);
  const remaining = all.filter((r) => !gone.includes(r));
  const keep = await reachable(store, rootsOf(remaining));
  for (const d of await reachable(store, rootsOf(gone))) {
    if (keep.has(d)) continue;
    const bytes = await size(store.path(d));
    await rm(store.path(d), { force: true });
    result.blobsRemoved++;
    result.bytesFreed += bytes;
  }
  const keepImages = new Set(remaining.map((r) => r.manifestDigest));
  for (const rec of gone) {
    if (keepImages.has(rec.manifestDigest)) continue;
    const dir = join(homePaths(home).images, rec.manifestDigest.slice(7));
    if (!existsSync(dir)) continue;
    // A tag shares its image's entry with the layout it was made from (oci:, builtin:): while
    // that layout exists the entry is the layout's too, as collectGarbage sees it.
    if (isLocalLayoutAlive(await builtFrom(dir))) continue;
    result.bytesFreed += await size(join(dir, ROOTFS_FILE));
    await rm(dir, { recursive: true, force: true });
    result.imagesRemoved++;
  }
  return result;
}

export interface CollectOptions {
  /**
   * Snapshot directories (each holding snapshots) besides `$SUPERMACHINE_HOME/snapshots`: a root
   * filesystem a snapshot there was made on is kept, since restoring the snapshot needs it.
   */
  snapshotDirs?: string[];
  /** Snapshots to disregard (a dry run lists them as removed before this runs). */
  ignoreSnapshots?: ReadonlySet<string>;
  /** Count what would be removed, remove nothing. */
  dryRun?: boolean;
}

export async function collectGarbage(home?: string, graceMs = 60 * 60_000, opts: CollectOptions = {}): Promise<GcResult> {
  const store = BlobStore.open(home);
  const refs = await listRefs(home);
  const roots = refs.flatMap((r) => [r.manifestDigest, ...(r.indexDigest ? [r.indexDigest] : [])]);
  const keep = await reachable(store, roots);
  const result: GcResult = { blobsRemoved: 0, imagesRemoved: 0, bytesFreed: 0 };
  const now = Date.now();
  for (const d of await store.list()) {
    if (keep.has(d)) continue;
    const st = await stat(store.path(d)).catch(() => undefined);
    if (!st || now - st.mtimeMs < graceMs) continue;
    if (!opts.dryRun) await rm(store.path(d), { force: true });
    result.blobsRemoved++;
    result.bytesFreed += st.size;
  }
  if (!opts.dryRun) await store.sweepTemps();

  // Squashfs entries: kept when a recorded reference resolves to them, when they were built
  // from a local layout (oci:, builtin:) that still exists, or when a snapshot was made on them.
  const keepImages = new Set(refs.map((r) => r.manifestDigest.slice(7)));
  const imagesDir = homePaths(home).images;
  for (const rootfs of await snapshotRootfs([homePaths(home).snapshots, ...(opts.snapshotDirs ?? [])], opts.ignoreSnapshots)) {
    if (dirname(dirname(rootfs)) === imagesDir) keepImages.add(basename(dirname(rootfs)));
  }
  let entries: string[] = [];
  try {
    entries = readdirSync(imagesDir).filter((n) => /^[a-f0-9]{64}$/.test(n));
  } catch {
    /* no images yet */
  }
  for (const hex of entries) {
    if (keepImages.has(hex)) continue;
    const dir = join(imagesDir, hex);
    let meta: { ref?: string; created?: string } = {};
    try {
      meta = JSON.parse(await readFile(join(dir, METADATA_FILE), "utf8")) as typeof meta;
    } catch {
      /* unreadable metadata: the entry is collected */
    }
    if (meta.ref && isLocalLayoutAlive(meta.ref)) continue;
    if (meta.created && now - Date.parse(meta.created) < graceMs) continue;
    const bytes = await size(join(dir, ROOTFS_FILE));
    if (!opts.dryRun) await rm(dir, { recursive: true, force: true });
    result.imagesRemoved++;
    result.bytesFreed += bytes;
    log("%s image entry %s (%s)", opts.dryRun ? "would remove" : "removed", hex, meta.ref ?? "unknown ref");
  }
  return result;
}

/** The root filesystems the snapshots in `dirs` were made on (their meta.json says). */
async function snapshotRootfs(dirs: string[], ignore: ReadonlySet<string> | undefined): Promise<Set<string>> {
  const out = new Set<string>();
  for (const dir of new Set(dirs)) {
    let names: string[];
    try {
      names = readdirSync(dir);
    } catch {
      continue;
    }
    for (const name of names) {
      if (ignore?.has(join(dir, name))) continue;
      // Temps of a bake in progress count too: the snapshot they become needs its rootfs.
      try {
        const meta = JSON.parse(await readFile(join(dir, name, SNAPSHOT_FILES.meta), "utf8")) as { image?: { rootfs?: unknown } };
        if (typeof meta.image?.rootfs === "string") out.add(meta.image.rootfs);
      } catch {
        /* not a snapshot */
      }
    }
  }
  return out;
}

/** The reference an image entry was built for (its metadata), "" when unreadable. */
async function builtFrom(dir: string): Promise<string> {
  try {
    return (JSON.parse(await readFile(join(dir, METADATA_FILE), "utf8")) as { ref?: string }).ref ?? "";
  } catch {
    return "";
  }
}

function isLocalLayoutAlive(ref: string): boolean {
  try {
    const p = parseImageRef(ref);
    if (p.kind === "builtin") return true;
    return p.kind === "oci" && existsSync(join(p.dir, "index.json"));
  } catch {
    return false;
  }
}
