/**
 * Import: snapshots from a cache into this machine's store, by key. Cache content is untrusted:
 * the manifest, config and indexes are bounded and validated, the key is recomputed from the
 * inputs, the engine must be this machine's, and every blob is checked against its digest and
 * every chunk against the sha256 of its bytes before the snapshot is published (atomically,
 * with the store's publish helper). Only what this machine lacks moves: a snapshot present with
 * that key moves nothing, chunks equal to ones of a local parent (or of the local root
 * filesystem) are copied from there.
 */
import { open, readdir, readFile, stat, writeFile, type FileHandle } from "node:fs/promises";
import { basename, join } from "node:path";
import { keyOf, type EngineFingerprint } from "../schema/key.js";
import { METADATA_FILE, ROOTFS_FILE, rootfsFacts } from "../store/images.js";
import { logger } from "../debug.js";
import { homePaths } from "../paths.js";
import { IMAGE_NAME } from "../schema/config.js";
import { publish } from "../store/publish.js";
import { ramSumsFrom } from "../store/ram-sums.js";
import { loadSnapshot, publishSnapshot, rootfsDigest, SNAPSHOT_FILES, sealSnapshot, type LoadedSnapshot, type SnapshotMeta } from "../store/snapshots.js";
import { openCache, type CacheBackend } from "./backend.js";
import { CacheError } from "./errors.js";
import {
  ANNOTATIONS,
  chunkLength,
  decodeChunkIndex,
  decompressBounded,
  digestOf,
  fileChunks,
  KEY_RE,
  LIMITS,
  manifestParts,
  maxBlobSize,
  parseConfig,
  parseManifest,
  sha256hex,
  type ArtifactManifest,
  type ChunkIndex,
  type Descriptor,
  type ManifestParts,
  type SnapshotConfig,
} from "./format.js";
import { Lanes } from "./lanes.js";
import { makeReport, type ImportOptions, type LocalEngine, type TransferEntry, type TransferReport } from "./report.js";

export type { ImportOptions, LocalEngine };

const log = logger("transfer");

/**
 * Imports the snapshots `keys` (and the ancestors they were baked on, parents first) from `src`
 * (a directory or a registry repository). Each is `imported`, `present` (this machine has it:
 * nothing moved) or `missing` (the cache does not have it).
 */
export async function importSnapshots(src: string, keys: string[], opts: ImportOptions): Promise<TransferReport> {
  const t0 = performance.now();
  for (const k of keys) {
    if (!KEY_RE.test(k)) throw new CacheError("CACHE_KEY_INVALID", `${JSON.stringify(k)} is not a snapshot key (64 lowercase hex digits)`, { hint: "supermachine ls shows the keys of a project's images" });
  }
  const backend = await openCache(src, { ...opts.registry, ...(opts.signal ? { signal: opts.signal } : {}) });
  try {
    const session = new ImportSession(backend, opts.snapshotsDir ?? homePaths().snapshots, opts);
    for (const k of keys) {
      opts.signal?.throwIfAborted();
      await session.import(k, 0);
    }
    return makeReport(backend.location, session.entries, t0);
  } finally {
    backend.close();
  }
}

interface Counters {
  chunksMoved: number;
  bytesMoved: number;
}

/** Where the bytes of a chunk can be copied from locally. */
type LocalChunks = Map<string, { file: string; offset: number; length: number }>;

const MAX_CHAIN = 64;

class ImportSession {
  readonly entries: TransferEntry[] = [];
  private readonly results = new Map<string, Promise<TransferEntry>>();

  constructor(
    private readonly backend: CacheBackend,
    private readonly snapshotsDir: string,
    /** Without `engine`, only root filesystems can be imported (importImage). */
    private readonly opts: Omit<ImportOptions, "engine"> & { engine?: LocalEngine },
  ) {}

  import(key: string, depth: number): Promise<TransferEntry> {
    let p = this.results.get(key);
    if (!p) {
      if (depth > MAX_CHAIN) throw new CacheError("CACHE_MANIFEST_INVALID", `snapshot ${key.slice(0, 16)} in cache ${this.backend.location}: its chain of parents is more than ${MAX_CHAIN} deep`);
      p = this.importOne(key, depth).then((e) => {
        this.entries.push(e);
        this.opts.onProgress?.({ type: "done", entry: e });
        return e;
      });
      this.results.set(key, p);
    }
    return p;
  }

  /** A snapshot with this key on this machine: at the directory asked for, else anywhere in snapshotsDir. */
  private async findLocal(key: string, anywhere: boolean): Promise<LoadedSnapshot | undefined> {
    const asked = this.opts.dirs?.get(key);
    const candidates = asked ? [asked] : [];
    if (anywhere || !asked) {
      const names = await readdir(this.snapshotsDir).catch(() => [] as string[]);
      for (const n of names) if (n.endsWith(`-${key.slice(0, 16)}`) && !n.includes(".tmp-")) candidates.push(join(this.snapshotsDir, n));
    }
    for (const dir of candidates) {
      const s = await loadSnapshot(dir, key).catch(() => undefined);
      if (s) return s;
    }
    return undefined;
  }

  private async importOne(key: string, depth: number): Promise<TransferEntry> {
    const local = await this.findLocal(key, false);
    if (local) {
      log("%s: present at %s", key, local.dir);
      return { name: local.meta.sources?.name ?? basename(local.dir), key, status: "present", chunks: 0, chunksMoved: 0, bytesMoved: 0 };
    }
    const where = `cache ${this.backend.location}`;
    const manifestBytes = await this.backend.readManifest(key);
    if (!manifestBytes) {
      log("%s: not in %s", key, where);
      return { name: "", key, status: "missing", chunks: 0, chunksMoved: 0, bytesMoved: 0 };
    }
    const c: Counters = { chunksMoved: 0, bytesMoved: manifestBytes.length };
    const manifest = parseManifest(manifestBytes, `the manifest of snapshot ${key.slice(0, 16)} in ${where}`);
    const name = manifest.annotations[ANNOTATIONS.name] ?? "";
    if (!IMAGE_NAME.test(name)) throw new CacheError("CACHE_MANIFEST_INVALID", `the manifest of snapshot ${key.slice(0, 16)} in ${where} names it ${JSON.stringify(name)}, not a valid image name`);
    const what = `snapshot ${name} (key ${key.slice(0, 16)}) in ${where}`;
    if (manifest.annotations[ANNOTATIONS.key] !== key) {
      throw new CacheError("CACHE_KEY_MISMATCH", `${what}: its manifest is annotated with key ${JSON.stringify(manifest.annotations[ANNOTATIONS.key])}`, { hint: "the cache entry was tampered with or is damaged: export the snapshot again" });
    }
    this.opts.onProgress?.({ type: "start", name, key });
    const config = parseConfig(await this.fetchVerified(manifest.config, LIMITS.configBytes, `the config of ${what}`, c), `the config of ${what}`);
    if (config.hash !== key || keyOf(config.inputs) !== key) {
      throw new CacheError("CACHE_KEY_MISMATCH", `${what}: its inputs hash to ${keyOf(config.inputs).slice(0, 16)}, not to the key it is stored under`, {
        hint: "the cache entry was tampered with or made by an incompatible version: nothing was imported",
      });
    }
    if (!this.opts.engine) throw new Error(`internal: importing ${what} needs the local engine`);
    checkEngine(config.inputs.engine, this.opts.engine, what);
    const parts = manifestParts(manifest, `the manifest of ${what}`);

    // Parents first: a child's chunks that its parent has are then copied locally.
    let parent: LoadedSnapshot | undefined;
    if (config.inputs.parent) {
      await this.import(config.inputs.parent, depth + 1);
      parent = await this.findLocal(config.inputs.parent, true);
    }
    const dir = this.opts.dirs?.get(key) ?? join(this.snapshotsDir, `${name}-${key.slice(0, 16)}`);
    const t0 = performance.now();
    const { created } = await publishSnapshot(dir, key, config.inputs, (tmp) => this.writeSnapshot(tmp, dir, what, config, manifest, parts, parent, c, { name, key }), this.opts.signal ? { signal: this.opts.signal } : {});
    if (!created) return { name, key, status: "present", chunks: 0, chunksMoved: 0, bytesMoved: 0 };
    log("%s: imported into %s in %d ms: %d chunks and %d bytes moved", what, dir, Math.round(performance.now() - t0), c.chunksMoved, c.bytesMoved);
    return { name, key, status: "imported", chunks: parts.chunks.size, ...c };
  }

  private async writeSnapshot(
    tmp: string,
    dir: string,
    what: string,
    config: SnapshotConfig,
    manifest: ArtifactManifest,
    parts: ManifestParts,
    parent: LoadedSnapshot | undefined,
    c: Counters,
    id: { name: string; key: string },
  ): Promise<SnapshotMeta> {
    const ramIndex = await this.index(parts.ramIndex, "ram", config.files.ram.size, parts, what, c);
    const rootfsIndex = await this.index(parts.rootfsIndex, "rootfs.sqfs", config.image.rootfsSize, parts, what, c);
    // The device state: small, one blob.
    const stateBlob = await this.fetchVerified(parts.state, maxBlobSize(config.files.state.size), `the device state of ${what}`, c);
    const state = decompressBounded(stateBlob, `the device state of ${what}`, { expected: config.files.state.size });
    if (sha256hex(state) !== config.files.state.sha256) throw new CacheError("CACHE_CHUNK_CORRUPT", `the device state of ${what} does not match its sha256`, { hint: "the cache entry is damaged: export the snapshot again" });
    await writeFile(join(tmp, SNAPSHOT_FILES.state), state);
    // RAM: chunks the parent has are copied from its RAM file, the rest fetched.
    const fromParent = parent ? await localChunks(parent.ram, parent.meta.files.ram.size) : new Map();
    await this.rebuild(join(tmp, SNAPSHOT_FILES.ram), ramIndex, fromParent, `the RAM of ${what}`, c, id);
    const rootfs = await this.rootfs(config, parts, rootfsIndex, tmp, dir, what, c);
    await writeFile(join(tmp, SNAPSHOT_FILES.log), `imported from ${this.backend.location} (manifest annotated ${manifest.annotations[ANNOTATIONS.created] ?? "?"}); key ${id.key}\n`);
    const { version: _v, files: _f, ...rest } = config;
    // Every RAM chunk was checked against its index's sha256 as it was written: the index gives
    // the snapshot's RAM checksums without reading the file again.
    // The digest of the root filesystem as this machine's image store records it (not the cache's word).
    const { rootfsSha256: _theirs, ...image } = config.image as SnapshotConfig["image"] & { rootfsSha256?: string };
    const localSha = await rootfsDigest(rootfs.path);
    const meta = await sealSnapshot(tmp, { ...rest, image: { ...image, rootfs: rootfs.path, rootfsSize: rootfs.size, ...(localSha ? { rootfsSha256: localSha } : {}) } }, what, { ramSums: ramSumsFrom(ramIndex) });
    if (meta.files.ram.size !== config.files.ram.size || meta.files.state.sha256 !== config.files.state.sha256) {
      throw new CacheError("CACHE_SNAPSHOT_INVALID", `${what}: the rebuilt files do not match its metadata`);
    }
    return meta;
  }

  /** A blob whose digest and size are checked before it is used. */
  async fetchVerified(desc: Pick<Descriptor, "digest" | "size">, limit: number, what: string, c: Counters): Promise<Buffer> {
    if (desc.size > limit) throw new CacheError("CACHE_TOO_LARGE", `${what} (${desc.digest}) is ${desc.size} bytes, more than the ${limit}-byte limit`);
    const bytes = await this.backend.readBlob(desc.digest, desc.size, what);
    if (!bytes) throw new CacheError("CACHE_MISSING", `${what}: blob ${desc.digest} is missing from cache ${this.backend.location}`, { hint: "the cache is incomplete: export the snapshot again" });
    c.bytesMoved += bytes.length;
    const actual = digestOf(bytes);
    if (actual !== desc.digest || bytes.length !== desc.size) {
      throw new CacheError("CACHE_DIGEST_MISMATCH", `${what}: blob ${desc.digest} in cache ${this.backend.location} hashes to ${actual} (${bytes.length} bytes, expected ${desc.size})`, {
        hint: "the cache holds corrupt or substituted data; nothing was imported. Export the snapshot again",
      });
    }
    return bytes;
  }

  async index(desc: Descriptor, file: ChunkIndex["file"], size: number, parts: ManifestParts, what: string, c: Counters): Promise<ChunkIndex> {
    const label = `the ${file} chunk index of ${what}`;
    const ix = decodeChunkIndex(await this.fetchVerified(desc, LIMITS.chunkIndexBytes, label, c), label);
    if (ix.file !== file || ix.size !== size) throw new CacheError("CACHE_INDEX_INVALID", `${label} describes ${ix.file} of ${ix.size} bytes, expected ${file} of ${size}`);
    for (const ch of ix.chunks) {
      // Every chunk must be a layer of the manifest (so a registry keeps it) of the same size.
      if (parts.chunks.get(ch.blob) !== ch.size) throw new CacheError("CACHE_INDEX_INVALID", `${label}: chunk ${ch.blob} at offset ${ch.offset} is not a layer of the manifest (or of another size)`);
    }
    return ix;
  }

  /** Writes `path` (sparse: holes stay holes) from the chunks of `index`. */
  async rebuild(path: string, index: ChunkIndex, local: LocalChunks, what: string, c: Counters, id?: { name: string; key: string }): Promise<void> {
    const groups = new Map<string, { sha256: string; size: number; length: number; offsets: number[] }>();
    for (const ch of index.chunks) {
      const length = chunkLength(index, ch.offset);
      const g = groups.get(ch.blob);
      if (!g) groups.set(ch.blob, { sha256: ch.sha256, size: ch.size, length, offsets: [ch.offset] });
      else if (g.sha256 !== ch.sha256 || g.length !== length) throw new CacheError("CACHE_INDEX_INVALID", `${what}: chunk ${ch.blob} is listed with two different contents`);
      else g.offsets.push(ch.offset);
    }
    const fh = await open(path, "wx");
    const sources = new Map<string, FileHandle>();
    try {
      await fh.truncate(index.size);
      const lanes = new Lanes(this.backend.parallelism);
      let done = 0;
      for (const [blob, g] of groups) {
        this.opts.signal?.throwIfAborted();
        const src = local.get(g.sha256);
        let data: Buffer | undefined;
        if (src && src.length === g.length) {
          let h = sources.get(src.file);
          if (!h) sources.set(src.file, (h = await open(src.file, "r")));
          const buf = Buffer.allocUnsafe(g.length);
          const { bytesRead } = await h.read(buf, 0, g.length, src.offset);
          // The local file may have changed since it was hashed: only equal bytes are used.
          if (bytesRead === g.length && sha256hex(buf) === g.sha256) data = buf;
        }
        if (data) {
          for (const o of g.offsets) await fh.write(data, 0, data.length, o);
          continue;
        }
        await lanes.run(async () => {
          const label = `chunk ${blob} of ${what}`;
          const z = await this.fetchVerified({ digest: blob, size: g.size }, maxBlobSize(index.chunkSize), label, c);
          const raw = decompressBounded(z, label, { expected: g.length });
          if (sha256hex(raw) !== g.sha256) throw new CacheError("CACHE_CHUNK_CORRUPT", `${label} does not match the sha256 its index records (${g.sha256.slice(0, 16)}…)`, { hint: "the cache holds corrupt data; nothing was imported" });
          for (const o of g.offsets) await fh.write(raw, 0, raw.length, o);
          c.chunksMoved++;
          if (id && ++done % 256 === 0) this.opts.onProgress?.({ type: "chunks", ...id, done, moved: c.chunksMoved });
        });
      }
      await lanes.drain();
    } finally {
      await fh.close();
      for (const h of sources.values()) await h.close();
    }
  }

  /**
   * The root filesystem the snapshot was made on, on this machine: the image store's entry when
   * it holds exactly those bytes (published from the cache when missing), else a private copy
   * inside the snapshot (a local build of the same image that differs byte for byte).
   */
  private async rootfs(config: SnapshotConfig, parts: ManifestParts, index: ChunkIndex, tmp: string, dir: string, what: string, c: Counters): Promise<{ path: string; size: number }> {
    const entry = await installImage(this, config.image.digest, parts, index, what, c);
    if (entry.same) return { path: entry.rootfsPath, size: entry.size };
    log("%s: the local root filesystem of %s differs from the one the snapshot was made on: keeping a copy in the snapshot", what, config.image.digest);
    await this.rebuild(join(tmp, ROOTFS_FILE), index, await localChunks(entry.rootfsPath, entry.size), `the root filesystem of ${what}`, c);
    return { path: join(dir, ROOTFS_FILE), size: index.size };
  }

  get location(): string {
    return this.backend.location;
  }
}

/** sha256 of every non-zero chunk of a local file → where it is. */
async function localChunks(file: string, size: number): Promise<LocalChunks> {
  const out: LocalChunks = new Map();
  for await (const { offset, data } of fileChunks(file, size)) {
    const h = sha256hex(data);
    if (!out.has(h)) out.set(h, { file, offset, length: data.length });
  }
  return out;
}

/** Whether a local file holds exactly the bytes an index describes. */
async function sameAs(file: string, size: number, index: ChunkIndex): Promise<boolean> {
  if (size !== index.size) return false;
  let i = 0;
  for await (const { offset, data } of fileChunks(file, size)) {
    const ch = index.chunks[i++];
    if (!ch || ch.offset !== offset || ch.sha256 !== sha256hex(data)) return false;
  }
  return i === index.chunks.length;
}

interface ImageMetadataFile {
  version: number;
  manifestDigest: string;
  sizeBytes: number;
}

/** The image store's entry for `digest` when it is complete: its rootfs and size. */
async function readImageEntry(entryDir: string, digest: string): Promise<{ rootfsPath: string; size: number } | undefined> {
  try {
    const meta = JSON.parse(await readFile(join(entryDir, METADATA_FILE), "utf8")) as ImageMetadataFile;
    const rootfsPath = join(entryDir, ROOTFS_FILE);
    const st = await stat(rootfsPath);
    if (meta.manifestDigest !== digest || !st.isFile() || st.size !== meta.sizeBytes) return undefined;
    return { rootfsPath, size: st.size };
  } catch {
    return undefined;
  }
}

/**
 * Makes sure the image store has the root filesystem of image `digest`: published from the
 * artifact (rootfs chunks and image.json, verified) when missing. `same` tells whether the entry
 * holds the bytes the artifact describes.
 */
async function installImage(session: ImportSession, digest: string, parts: ManifestParts, index: ChunkIndex, what: string, c: Counters): Promise<{ rootfsPath: string; size: number; same: boolean }> {
  const hex = digest.slice("sha256:".length);
  const entryDir = join(homePaths().images, hex);
  const { value, created } = await publish({
    target: entryDir,
    kind: "dir",
    what: `image ${digest} (root filesystem from cache ${session.location})`,
    check: () => readImageEntry(entryDir, digest),
    write: async (tmpDir) => {
      const label = `the image metadata of ${what}`;
      const metaBytes = await session.fetchVerified(parts.imageMeta, LIMITS.imageMetaBytes, label, c);
      let meta: ImageMetadataFile;
      try {
        meta = JSON.parse(metaBytes.toString("utf8")) as ImageMetadataFile;
      } catch (cause) {
        throw new CacheError("CACHE_CONFIG_INVALID", `${label} is not valid JSON`, { cause });
      }
      if (meta?.manifestDigest !== digest || meta.sizeBytes !== index.size || typeof meta.version !== "number") {
        throw new CacheError("CACHE_CONFIG_INVALID", `${label} describes image ${JSON.stringify(meta?.manifestDigest)} of ${meta?.sizeBytes} bytes, expected ${digest} of ${index.size}`);
      }
      await session.rebuild(join(tmpDir, ROOTFS_FILE), index, new Map(), `the root filesystem of ${what}`, c);
      // Its digest and mtime as written here (what the entry records is this machine's, as when built here).
      await writeFile(join(tmpDir, METADATA_FILE), JSON.stringify({ ...(meta as object), ...(await rootfsFacts(join(tmpDir, ROOTFS_FILE))) }, null, 2) + "\n");
      return { rootfsPath: join(entryDir, ROOTFS_FILE), size: index.size };
    },
    tmpPrefix: `.tmp-${hex}-`, // as resolveImage names its temps: either one cleans up after the other
  });
  if (created) {
    log("image %s: root filesystem published from %s", digest, session.location);
    return { ...value, same: true };
  }
  return { ...value, same: await sameAs(value.rootfsPath, value.size, index) };
}

/**
 * Publishes the root filesystem of image `digest` into the image store when the store lacks it
 * and the cache has a snapshot made on it. Resolves true when it did.
 */
export async function importImage(backend: CacheBackend, digest: string): Promise<boolean> {
  const entryDir = join(homePaths().images, digest.slice("sha256:".length));
  if (await readImageEntry(entryDir, digest)) return false;
  const bytes = await backend.readImageManifest(digest);
  if (!bytes) return false;
  const what = `image ${digest} in cache ${backend.location}`;
  const manifest = parseManifest(bytes, `the manifest carrying ${what}`);
  if (manifest.annotations[ANNOTATIONS.image] !== digest) throw new CacheError("CACHE_MANIFEST_INVALID", `the manifest tagged for ${what} is annotated with image ${JSON.stringify(manifest.annotations[ANNOTATIONS.image])}`);
  const parts = manifestParts(manifest, `the manifest carrying ${what}`);
  const size = Number(parts.rootfsIndex.annotations?.[ANNOTATIONS.size]);
  if (!Number.isSafeInteger(size) || size < 0) throw new CacheError("CACHE_MANIFEST_INVALID", `the manifest carrying ${what} does not give the size of the root filesystem`);
  const session = new ImportSession(backend, homePaths().snapshots, {});
  const c: Counters = { chunksMoved: 0, bytesMoved: 0 };
  const index = await session.index(parts.rootfsIndex, "rootfs.sqfs", size, parts, what, c);
  await installImage(session, digest, parts, index, what, c);
  return true;
}

const FIELD_NAMES: Record<string, string> = { kernelKey: "kernel", agentKey: "agent", agentVersion: "agent", qemu: "qemu", accel: "accel" };

/** The snapshot's engine must be this machine's, field by field (and its accelerator usable here). */
function checkEngine(theirs: EngineFingerprint, engine: LocalEngine, what: string): void {
  const here = engine.fingerprint(theirs.accel);
  const mismatch = (field: string, a: unknown, b: unknown) =>
    new CacheError("CACHE_ENGINE_MISMATCH", `${what} was made by another engine: its ${field} is ${JSON.stringify(a)}, this machine's is ${JSON.stringify(b)}`, {
      hint: "a snapshot restores only into the kernel, agent and QEMU that made it: bake it here (supermachine build), or share caches between machines set up alike",
    });
  const t = theirs as unknown as Record<string, unknown>;
  const h = here as unknown as Record<string, unknown>;
  for (const k of [...new Set([...Object.keys(h), ...Object.keys(t)])]) {
    if (t[k] !== h[k]) throw mismatch(FIELD_NAMES[k] ?? k, t[k], h[k]);
  }
  if (theirs.accel === "kvm") {
    const now = engine.accelNow();
    if (now !== "kvm") throw mismatch("accel", "kvm", now);
  }
}
