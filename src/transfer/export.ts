/**
 * Export: snapshots of this machine into a cache (directory or registry). A snapshot the cache
 * has (by key) is not read at all; otherwise every blob is checked first and only missing ones
 * are written, so a child costs its changed chunks, its state and its metadata.
 */
import { readFile, stat } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { logger } from "../debug.js";
import { METADATA_FILE } from "../store/images.js";
import { keyOf, stableJson } from "../schema/key.js";
import { readRamSums, type RamSums } from "../store/ram-sums.js";
import { loadSnapshot, SNAPSHOT_FILES, type LoadedSnapshot } from "../store/snapshots.js";
import { openCache, type CacheBackend } from "./backend.js";
import { CacheError } from "./errors.js";
import {
  ANNOTATIONS,
  CHUNK_SIZE,
  compress,
  digestOf,
  encodeChunkIndex,
  encodeManifest,
  fileChunks,
  FORMAT_VERSION,
  LIMITS,
  MEDIA,
  sha256hex,
  toConfig,
  type ArtifactManifest,
  type ChunkEntry,
  type ChunkIndex,
  type Descriptor,
} from "./format.js";
import { Lanes } from "./lanes.js";
import { makeReport, type TransferEntry, type TransferOptions, type TransferReport } from "./report.js";

const log = logger("transfer");

/** The name a snapshot travels under: its image's name in the project, else its directory's. */
export function snapshotName(s: LoadedSnapshot): string {
  return s.meta.sources?.name ?? basename(s.dir);
}

/**
 * Exports `snapshots` (directories or loaded snapshots) to `dest`, parents before children.
 * Resolves with what happened to each: `exported`, or `present` when the cache had its key.
 */
export async function exportSnapshots(dest: string, snapshots: Array<{ dir: string } | LoadedSnapshot>, opts: TransferOptions = {}): Promise<TransferReport> {
  const t0 = performance.now();
  const loaded: LoadedSnapshot[] = [];
  for (const s of snapshots) {
    if ("meta" in s) loaded.push(s);
    else {
      const snap = await loadSnapshot(s.dir);
      if (!snap) throw new CacheError("CACHE_SNAPSHOT_INVALID", `there is no snapshot at ${s.dir}`, { hint: "bake it first (supermachine build)" });
      loaded.push(snap);
    }
  }
  const backend = await openCache(dest, { ...opts.registry, ...(opts.signal ? { signal: opts.signal } : {}) });
  try {
    const session = new ExportSession(backend, opts);
    const entries: TransferEntry[] = [];
    for (const snap of parentsFirst(loaded)) {
      opts.signal?.throwIfAborted();
      entries.push(await session.export(snap));
    }
    return makeReport(backend.location, entries, t0);
  } finally {
    backend.close();
  }
}

/** Distinct by key, each parent (when in the list) before its children. */
function parentsFirst(list: LoadedSnapshot[]): LoadedSnapshot[] {
  const byKey = new Map(list.map((s) => [s.meta.hash, s]));
  const out: LoadedSnapshot[] = [];
  const done = new Set<string>();
  const visit = (s: LoadedSnapshot) => {
    if (done.has(s.meta.hash)) return;
    done.add(s.meta.hash);
    const parent = s.meta.inputs.parent ? byKey.get(s.meta.inputs.parent) : undefined;
    if (parent) visit(parent);
    out.push(s);
  };
  list.forEach(visit);
  return out;
}

interface Counters {
  chunksMoved: number;
  bytesMoved: number;
}

interface RootfsPart {
  index: Descriptor;
  meta: Descriptor;
  chunks: Map<string, number>;
}

class ExportSession {
  /** Blobs known to be at the destination (or on their way there), by digest: whether this session wrote them. */
  private readonly blobs = new Map<string, Promise<boolean>>();
  private readonly rootfs = new Map<string, Promise<RootfsPart>>();
  private readonly lanes: number;

  constructor(
    private readonly backend: CacheBackend,
    private readonly opts: TransferOptions,
  ) {
    this.lanes = backend.parallelism;
  }

  /** Writes a blob unless the destination has it; resolves true when it was written now. */
  private put(digest: string, data: Buffer): Promise<boolean> {
    const known = this.blobs.get(digest);
    if (known) return known.then(() => false); // counted by whoever put it first
    {
      const p = (async () => {
        if ((await this.backend.blobSize(digest)) === data.length) return false;
        await this.backend.writeBlob(digest, data);
        return true;
      })();
      this.blobs.set(digest, p);
      // A failed put is not "known": a retry checks again.
      p.catch(() => this.blobs.delete(digest));
      return p;
    }
  }

  private async putCounted(digest: string, data: Buffer, c: Counters, chunk: boolean): Promise<Descriptor> {
    if (await this.put(digest, data)) {
      c.bytesMoved += data.length;
      if (chunk) c.chunksMoved++;
    }
    return { mediaType: "", digest, size: data.length };
  }

  /**
   * Chunks `path` into the destination; returns the index and every chunk's compressed size.
   * With `sums` (a snapshot's RAM checksums, same chunking), every chunk must match them: a
   * damaged snapshot is refused rather than exported.
   */
  private async chunkFile(path: string, size: number, file: ChunkIndex["file"], c: Counters, progress?: (done: number) => void, check?: { sums: RamSums; dir: string }): Promise<{ index: ChunkIndex; chunks: Map<string, number> }> {
    const lanes = new Lanes(this.lanes);
    const entries: ChunkEntry[] = [];
    const chunks = new Map<string, number>();
    const refuse = (why: string) =>
      new CacheError("CACHE_SNAPSHOT_INVALID", `snapshot ${check!.dir} is damaged: its RAM differs from its checksums ${why}; it was not exported`, {
        hint: "supermachine verify --fix quarantines it; build it again (supermachine build) before exporting",
      });
    for await (const { offset, data } of fileChunks(path, size)) {
      this.opts.signal?.throwIfAborted();
      const z = compress(data);
      const blob = digestOf(z);
      const sha256 = sha256hex(data);
      if (check && check.sums.chunks.get(offset / CHUNK_SIZE)?.toString("hex") !== sha256) throw refuse(`at offset ${offset}`);
      entries.push({ offset, blob, size: z.length, sha256 });
      if (!chunks.has(blob)) {
        chunks.set(blob, z.length);
        await lanes.run(async () => void (await this.putCounted(blob, z, c, true)));
      }
      if (entries.length % 256 === 0) progress?.(entries.length);
    }
    await lanes.drain();
    if (check && entries.length !== check.sums.chunks.size) throw refuse(`(${check.sums.chunks.size - entries.length} chunks read back as zeroes)`);
    return { index: { version: FORMAT_VERSION, file, size, chunkSize: CHUNK_SIZE, compression: "zstd", chunks: entries }, chunks };
  }

  /** The image's root filesystem and metadata, put once per image whatever the number of snapshots on it. */
  private rootfsOf(snap: LoadedSnapshot, c: Counters): Promise<RootfsPart> {
    const digest = snap.meta.image.digest;
    let p = this.rootfs.get(digest);
    if (!p) {
      p = (async () => {
        const path = snap.meta.image.rootfs;
        const size = (await stat(path)).size;
        const metaPath = join(dirname(path), METADATA_FILE);
        const metaBytes = await readFile(metaPath).catch((cause: unknown) => {
          throw new CacheError("CACHE_SNAPSHOT_INVALID", `snapshot ${snap.dir}: the metadata of its root filesystem (${metaPath}) cannot be read`, { cause, hint: "rebuild the image (supermachine build --force)" });
        });
        if (metaBytes.length > LIMITS.imageMetaBytes) throw new CacheError("CACHE_TOO_LARGE", `${metaPath} is larger than ${LIMITS.imageMetaBytes} bytes`);
        const { index, chunks } = await this.chunkFile(path, size, "rootfs.sqfs", c);
        const ib = encodeChunkIndex(index);
        const indexDesc = await this.putCounted(digestOf(ib), ib, c, false);
        const metaDesc = await this.putCounted(digestOf(metaBytes), metaBytes, c, false);
        return {
          index: { ...indexDesc, mediaType: MEDIA.chunkIndex, annotations: { [ANNOTATIONS.file]: "rootfs.sqfs", [ANNOTATIONS.size]: String(size) } },
          meta: { ...metaDesc, mediaType: MEDIA.imageMeta, annotations: { [ANNOTATIONS.file]: METADATA_FILE } },
          chunks,
        };
      })();
      this.rootfs.set(digest, p);
    }
    return p;
  }

  async export(snap: LoadedSnapshot): Promise<TransferEntry> {
    const meta = snap.meta;
    const key = meta.hash;
    const name = snapshotName(snap);
    if (keyOf(meta.inputs) !== key) {
      throw new CacheError("CACHE_SNAPSHOT_INVALID", `snapshot ${snap.dir} (${name}) is not keyed by its inputs (a capture of a running VM, or made by another version)`, {
        hint: "only snapshots baked by Image.build or supermachine build can be exported",
      });
    }
    this.opts.onProgress?.({ type: "start", name, key });
    if (await this.backend.hasSnapshot(key)) {
      log("%s (%s): already in %s", name, key, this.backend.location);
      return this.done({ name, key, status: "present", chunks: 0, chunksMoved: 0, bytesMoved: 0 });
    }
    const t0 = performance.now();
    const c: Counters = { chunksMoved: 0, bytesMoved: 0 };
    const rootfs = await this.rootfsOf(snap, c);
    const sums = await readRamSums(join(snap.dir, SNAPSHOT_FILES.sums), meta.files.ram.sums);
    if (typeof sums === "string") throw new CacheError("CACHE_SNAPSHOT_INVALID", `snapshot ${snap.dir} is damaged: ${sums}; it was not exported`, { hint: "build it again (supermachine build) before exporting" });
    const ram = await this.chunkFile(snap.ram, meta.files.ram.size, "ram", c, (done) => this.opts.onProgress?.({ type: "chunks", name, key, done, moved: c.chunksMoved }), sums.chunkSize === CHUNK_SIZE ? { sums, dir: snap.dir } : undefined);
    const state = compress(await readFile(snap.state));
    const stateDesc = await this.putCounted(digestOf(state), state, c, false);
    const ib = encodeChunkIndex(ram.index);
    const ramIndexDesc = await this.putCounted(digestOf(ib), ib, c, false);
    const configBytes = Buffer.from(JSON.stringify(toConfig(meta)));
    const configDesc = await this.putCounted(digestOf(configBytes), configBytes, c, false);

    const chunkLayers: Descriptor[] = [];
    const listed = new Set<string>();
    for (const m of [ram.chunks, rootfs.chunks]) {
      for (const [digest, size] of m) {
        if (listed.has(digest)) continue;
        listed.add(digest);
        chunkLayers.push({ mediaType: MEDIA.chunk, digest, size });
      }
    }
    const manifest: ArtifactManifest = {
      schemaVersion: 2,
      mediaType: MEDIA.manifest,
      artifactType: MEDIA.artifact,
      config: { ...configDesc, mediaType: MEDIA.config },
      layers: [
        { ...stateDesc, mediaType: MEDIA.state, annotations: { [ANNOTATIONS.size]: String(meta.files.state.size) } },
        { ...ramIndexDesc, mediaType: MEDIA.chunkIndex, annotations: { [ANNOTATIONS.file]: "ram", [ANNOTATIONS.size]: String(meta.files.ram.size) } },
        rootfs.index,
        rootfs.meta,
        ...chunkLayers,
      ],
      annotations: {
        [ANNOTATIONS.key]: key,
        [ANNOTATIONS.name]: name,
        ...(meta.inputs.parent ? { [ANNOTATIONS.parent]: meta.inputs.parent } : {}),
        [ANNOTATIONS.engine]: stableJson(meta.inputs.engine),
        [ANNOTATIONS.image]: meta.image.digest,
        [ANNOTATIONS.created]: meta.created,
      },
    };
    const bytes = encodeManifest(manifest);
    await this.backend.writeManifest(key, bytes, manifest);
    c.bytesMoved += bytes.length;
    log("%s (%s): exported to %s in %d ms: %d of %d chunks, %d bytes", name, key, this.backend.location, Math.round(performance.now() - t0), c.chunksMoved, listed.size, c.bytesMoved);
    return this.done({ name, key, status: "exported", chunks: listed.size, ...c });
  }

  private done(entry: TransferEntry): TransferEntry {
    this.opts.onProgress?.({ type: "done", entry });
    return entry;
  }
}
