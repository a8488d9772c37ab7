/**
 * Import: snapshots from a cache into this machine's store, by key. Cache content is untrusted:
 * the manifest and config are bounded and validated (a version 1 entry is refused by name), the
 * key is recomputed from the inputs, the engine must be this machine's, and every frame is
 * decompressed to its chunk's exact length and checked against the sha256 its index records
 * before the snapshot is published (atomically, with the store's publish helper). Only what this
 * machine lacks moves: a snapshot present with that key moves nothing, chunks its local parent
 * has are copied from the parent's RAM file, and of a pack only the frames still needed are
 * read (byte ranges, or the whole pack when most of it is needed).
 */
import { open, readdir, writeFile, type FileHandle } from "node:fs/promises";
import { basename, join } from "node:path";
import { logger } from "../debug.js";
import { homePaths } from "../paths.js";
import { IMAGE_NAME } from "../schema/config.js";
import { hostDifferences, hostMismatch } from "../schema/host.js";
import { keyOf, type EngineFingerprint } from "../schema/key.js";
import { ramSumsFrom, readRamSums } from "../store/ram-sums.js";
import { loadSnapshot, publishSnapshot, rootfsDigest, SNAPSHOT_FILES, sealSnapshot, type LoadedSnapshot, type SnapshotMeta } from "../store/snapshots.js";
import { openCache, type CacheBackend } from "./backend.js";
import { CacheError } from "./errors.js";
import { localChunks, RunWriter, type LocalChunks } from "./files.js";
import {
  ANNOTATIONS,
  CHUNK_SIZE,
  checkFrames,
  chunkLength,
  decodeConfig,
  decodeFileIndex,
  digestOf,
  KEY_RE,
  LIMITS,
  manifestParts,
  MEDIA,
  parseManifest,
  sha256hex,
  type ArtifactConfig,
  type ArtifactManifest,
  type Descriptor,
  type FileIndex,
  type FrameRef,
  type IndexedFile,
  type ManifestParts,
} from "./format.js";
import { Lanes } from "./lanes.js";
import { readFrames, type FrameWant } from "./packs.js";
import { makeReport, type ImportOptions, type LocalEngine, type TransferEntry, type TransferReport } from "./report.js";
import { installImage, readImageEntry } from "./rootfs.js";
import { keepConfigCopy } from "./config-memo.js";
import { checkSignature, parseTrust, type CacheTrust } from "./sign.js";
import { checkBehaviour, checkChild, checkEngine } from "./checks.js";
import { decompressBounded } from "./zstd.js";
import { unpackChunks, type UnpackResult } from "./workers.js";

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
    return makeReport(backend, session.entries, t0);
  } finally {
    backend.close();
  }
}

export interface Counters {
  chunksMoved: number;
  bytesMoved: number;
}

const MAX_CHAIN = 64;
/** Root filesystem packs asked for ahead of need, at most (each up to the pack size limit in memory). */
const PREFETCH_PACKS = 4;
/** Compressed bytes of frames per batch handed to a transfer worker on import. */
const UNPACK_BATCH = 1024 * 1024;

export class ImportSession {
  readonly entries: TransferEntry[] = [];
  private readonly results = new Map<string, Promise<TransferEntry>>();

  private readonly trust: ReturnType<typeof parseTrust>;
  /** Blobs asked for before they are needed (a fresh machine's root filesystem), by digest. */
  private readonly prefetched = new Map<string, Promise<Buffer | undefined>>();

  constructor(
    readonly backend: CacheBackend,
    private readonly snapshotsDir: string,
    /** Without `engine`, only root filesystems can be imported (importImage). */
    private readonly opts: Omit<ImportOptions, "engine"> & { engine?: LocalEngine },
  ) {
    this.trust = parseTrust(opts.trust ?? [], "trust");
  }

  /** Checks `manifest`'s signature against the trusted keys (CACHE_UNTRUSTED otherwise): true when a trusted key signed it. */
  signedByTrusted(manifest: Buffer, what: string): boolean {
    return checkSignature(manifest, this.trust, what).signedBy !== undefined;
  }

  get location(): string {
    return this.backend.location;
  }

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
      await this.explainMiss(key, where);
      return { name: "", key, status: "missing", chunks: 0, chunksMoved: 0, bytesMoved: 0 };
    }
    const c: Counters = { chunksMoved: 0, bytesMoved: manifestBytes.length };
    const manifest = parseManifest(manifestBytes, `the manifest of snapshot ${key.slice(0, 16)} in ${where}`);
    // Trusted first: nothing an untrusted writer supplied is read further.
    const signed = this.signedByTrusted(manifestBytes, `snapshot ${key.slice(0, 16)} in ${where}`);
    const name = manifest.annotations[ANNOTATIONS.name] ?? "";
    if (!IMAGE_NAME.test(name)) throw new CacheError("CACHE_MANIFEST_INVALID", `the manifest of snapshot ${key.slice(0, 16)} in ${where} names it ${JSON.stringify(name)}, not a valid image name`);
    const what = `snapshot ${name} (key ${key.slice(0, 16)}) in ${where}`;
    if (manifest.annotations[ANNOTATIONS.key] !== key) {
      throw new CacheError("CACHE_KEY_MISMATCH", `${what}: its manifest is annotated with key ${JSON.stringify(manifest.annotations[ANNOTATIONS.key])}`, { hint: "the cache entry was tampered with or is damaged: export the snapshot again" });
    }
    this.opts.onProgress?.({ type: "start", name, key });
    if (!this.opts.engine) throw new Error(`internal: importing ${what} needs the local engine`);
    const parts = manifestParts(manifest, `the manifest of ${what}`);
    await this.prefetchRootfs(manifest, parts, what);
    const engine = this.opts.engine;
    // The snapshot's metadata is checked before its RAM index is parsed: the key recomputed from
    // its inputs, the engine, and that it runs what its key (and this project) says.
    const configBytes = await this.fetchVerified(manifest.config, LIMITS.configBytes, `the config of ${what}`, c);
    const config = decodeConfig(configBytes, `the config of ${what}`, (snap) => {
      if (snap.hash !== key || keyOf(snap.inputs) !== key) {
        throw new CacheError("CACHE_KEY_MISMATCH", `${what}: its inputs hash to ${keyOf(snap.inputs).slice(0, 16)}, not to the key it is stored under`, {
          hint: "the cache entry was tampered with or made by an incompatible version: nothing was imported",
        });
      }
      checkEngine(snap.inputs.engine, engine, what);
      checkBehaviour(snap, what, this.opts.expect?.get(key));
    });
    const snap = config.snapshot;
    // A child exported from here later reads where its parent's chunks are from this copy.
    await keepConfigCopy(manifest.config.digest, configBytes);
    checkFrames([...config.ram.chunks, config.state], parts.packs, `the config of ${what}`);

    // Parents first: a child's chunks that its parent has are then copied locally.
    let parent: LoadedSnapshot | undefined;
    if (snap.inputs.parent) {
      await this.import(snap.inputs.parent, depth + 1);
      parent = await this.findLocal(snap.inputs.parent, true);
      // A child runs on its parent's image, with its parent's workload.
      if (parent) checkChild(snap, parent.meta, what);
    }
    const dir = this.opts.dirs?.get(key) ?? join(this.snapshotsDir, `${name}-${key.slice(0, 16)}`);
    const t0 = performance.now();
    const { created } = await publishSnapshot(dir, key, snap.inputs, (tmp) => this.writeSnapshot(tmp, dir, what, config, parts, parent, c, { name, key }, signed), this.opts.signal ? { signal: this.opts.signal } : {});
    if (!created) return { name, key, status: "present", chunks: 0, chunksMoved: 0, bytesMoved: 0 };
    log("%s: imported into %s in %d ms: %d chunks and %d bytes moved", what, dir, Math.round(performance.now() - t0), c.chunksMoved, c.bytesMoved);
    return { name, key, status: "imported", chunks: new Set(config.ram.chunks.map((ch) => ch.sha256)).size, ...c };
  }

  /**
   * The cache lacks `key`: when it has the same recipe (src/schema/host.ts) signed by a trusted
   * key and made on another host, throws SNAPSHOT_HOST_MISMATCH naming the differences.
   */
  private async explainMiss(key: string, where: string): Promise<void> {
    const recipe = this.opts.recipes?.get(key);
    if (!recipe || !this.opts.engine) return;
    const bytes = await this.backend.readRecipeManifest(recipe).catch(() => undefined);
    if (!bytes) return;
    let engine: unknown;
    let theirs: string | undefined;
    let name: string | undefined;
    try {
      const m = parseManifest(bytes, `the manifest of recipe ${recipe.slice(0, 16)} in ${where}`, "null");
      // Only what this project would import speaks for the cache (signed by a trusted key, or
      // anything with trust "unsigned"); anything else is a plain miss. It explains a refusal
      // only: nothing of it is imported.
      if (!m || m.annotations[ANNOTATIONS.recipe] !== recipe) return;
      if (this.trust !== "unsigned" && !this.signedByTrusted(bytes, `the snapshot of recipe ${recipe.slice(0, 16)} in ${where}`)) return;
      engine = JSON.parse(m.annotations[ANNOTATIONS.engine] ?? "null");
      theirs = m.annotations[ANNOTATIONS.key];
      name = m.annotations[ANNOTATIONS.name];
    } catch (err) {
      log("%s: recipe %s in %s not usable: %s", key.slice(0, 16), recipe.slice(0, 16), where, (err as Error).message);
      return;
    }
    const e = this.opts.engine;
    const diffs = hostDifferences(engine, e.fingerprint(e.accelNow()));
    if (diffs.length) throw hostMismatch(`snapshot ${name && IMAGE_NAME.test(name) ? `${name} ` : ""}(key ${key.slice(0, 16)}) is not in ${where}; its image there (key ${String(theirs).slice(0, 16)})`, diffs);
    log("%s: %s has its recipe under key %s, made on this host's QEMU and CPU (another kernel or agent?)", key.slice(0, 16), where, String(theirs).slice(0, 16));
  }

  private async writeSnapshot(tmp: string, dir: string, what: string, config: ArtifactConfig, parts: ManifestParts, parent: LoadedSnapshot | undefined, c: Counters, id: { name: string; key: string }, signed: boolean): Promise<SnapshotMeta> {
    const snap = config.snapshot;
    // The root filesystem (its index, then what the image store lacks) comes while the RAM does.
    // Only a signed artifact may add an image to the store; an unsigned one keeps what it
    // brought inside its own snapshot.
    const rootfsP = (async () => {
      const rootfsIndex = await this.fileIndex(parts.rootfsIndex, "rootfs.sqfs", snap.image.rootfsSize, parts, what, c);
      return installImage(this, snap.image.digest, parts, rootfsIndex, { tmp, dir, publish: signed }, what, c);
    })();
    rootfsP.catch(() => undefined); // awaited below; a RAM failure first must not leave it unhandled
    // RAM and state together: frames of one pack are read in one pass.
    let state: Buffer | undefined;
    try {
      const fromParent = parent ? await parentChunks(parent) : new Map();
      await this.rebuild(join(tmp, SNAPSHOT_FILES.ram), config.ram, fromParent, parts.packs, `the RAM of ${what}`, c, id, {
        ref: config.state,
        use: async (frame) => {
          const label = `the device state of ${what}`;
          const bytes = decompressBounded(frame, label, { expected: config.state.length });
          if (sha256hex(bytes) !== config.state.sha256) throw new CacheError("CACHE_CHUNK_CORRUPT", `${label} does not match its sha256`, { hint: "the cache entry is damaged: export the snapshot again" });
          state = bytes;
        },
      });
    } catch (err) {
      // Nothing may still write into the temp directory once the failure removes it.
      await rootfsP.catch(() => undefined);
      throw err;
    }
    if (!state) throw new Error(`internal: the state of ${what} was not read`);
    await writeFile(join(tmp, SNAPSHOT_FILES.state), state);
    const rootfs = await rootfsP;
    await writeFile(join(tmp, SNAPSHOT_FILES.log), `imported from ${this.backend.location} (created ${snap.created}); key ${id.key}\n`);
    const { version: _v, files: _f, ...rest } = snap;
    // The digest of the root filesystem as this machine's image store records it (not the cache's word).
    const { rootfsSha256: _theirs, ...image } = snap.image;
    const localSha = await rootfsDigest(rootfs.path);
    // Every RAM chunk was checked against its index's sha256 as it was written: the index gives
    // the snapshot's RAM checksums without reading the file again.
    const meta = await sealSnapshot(tmp, { ...rest, image: { ...image, rootfs: rootfs.path, rootfsSize: rootfs.size, ...(localSha ? { rootfsSha256: localSha } : {}) } }, what, { ramSums: ramSumsFrom({ chunkSize: CHUNK_SIZE, size: config.ram.size, chunks: config.ram.chunks }) });
    if (meta.files.ram.size !== snap.files.ram.size || meta.files.state.sha256 !== snap.files.state.sha256) {
      throw new CacheError("CACHE_SNAPSHOT_INVALID", `${what}: the rebuilt files do not match its metadata`);
    }
    return meta;
  }

  /** Starts reading a blob now (at most `size` bytes); whoever needs it later takes it, unverified as any read. */
  private prefetch(digest: string, size: number, what: string): void {
    if (this.prefetched.has(digest)) return;
    const p = this.backend.readBlob(digest, size, what);
    p.catch(() => undefined); // a failure is met again by whoever takes it
    this.prefetched.set(digest, p);
  }

  /** A prefetched blob's bytes (once), or undefined when it was not prefetched. */
  takePrefetched(digest: string): Promise<Buffer | undefined> | undefined {
    const p = this.prefetched.get(digest);
    if (p) this.prefetched.delete(digest);
    return p;
  }

  /**
   * After a trusted manifest, before its config: when this machine lacks the snapshot's image, its
   * root filesystem will be rebuilt from all its packs, and a snapshot without a parent from all
   * its RAM packs, so those (at most PREFETCH_PACKS, root filesystem first), the root filesystem's
   * index and image.json are asked for now rather than one or two round trips later.
   */
  private async prefetchRootfs(manifest: ArtifactManifest, parts: ManifestParts, what: string): Promise<void> {
    const image = manifest.annotations[ANNOTATIONS.image];
    this.prefetch(parts.rootfsIndex.digest, Math.min(parts.rootfsIndex.size, LIMITS.fileIndexBytes), `the rootfs.sqfs index of ${what}`);
    const wanted: string[] = [];
    if (typeof image === "string" && /^sha256:[0-9a-f]{64}$/.test(image) && !(await readImageEntry(join(homePaths().images, image.slice(7)), image))) {
      this.prefetch(parts.imageMeta.digest, Math.min(parts.imageMeta.size, LIMITS.imageMetaBytes), `the image metadata of ${what}`);
      wanted.push("rootfs.sqfs");
    }
    // A snapshot without a parent has no chunks on this machine to copy: its RAM packs are read whole.
    if (manifest.annotations[ANNOTATIONS.parent] === undefined) wanted.push("ram");
    let n = 0;
    for (const file of wanted) {
      for (const l of manifest.layers) {
        if (l.mediaType !== MEDIA.pack || l.annotations?.[ANNOTATIONS.file] !== file) continue;
        if (n++ >= PREFETCH_PACKS) return;
        this.prefetch(l.digest, l.size, `pack ${l.digest.slice(7, 19)} of ${what}`);
      }
    }
  }

  /** A blob whose digest and size are checked before it is used. */
  async fetchVerified(desc: Pick<Descriptor, "digest" | "size">, limit: number, what: string, c: Counters): Promise<Buffer> {
    if (desc.size > limit) throw new CacheError("CACHE_TOO_LARGE", `${what} (${desc.digest}) is ${desc.size} bytes, more than the ${limit}-byte limit`);
    const bytes = await (this.takePrefetched(desc.digest) ?? this.backend.readBlob(desc.digest, desc.size, what));
    if (!bytes) throw new CacheError("CACHE_MISSING", `${what}: blob ${desc.digest} is missing from cache ${this.backend.location}`, { hint: "the cache is incomplete: export the snapshot again" });
    c.bytesMoved += bytes.length;
    const actual = digestOf(bytes);
    if (actual !== desc.digest || bytes.length !== desc.size) {
      throw new CacheError("CACHE_DIGEST_MISMATCH", `${what}: blob ${desc.digest} in cache ${this.backend.location} does not hash to its digest (or is not ${desc.size} bytes)`, {
        hint: "the cache holds corrupt or substituted data; nothing was imported. Export the snapshot again",
      });
    }
    return bytes;
  }

  /** A file index layer, checked: its shape, the file it describes, and that every frame lies in a listed pack. */
  async fileIndex(desc: Descriptor, file: IndexedFile, size: number, parts: ManifestParts, what: string, c: Counters): Promise<FileIndex> {
    const label = `the ${file} index of ${what}`;
    if (file === "rootfs.sqfs" && size > LIMITS.rootfsBytes) throw new CacheError("CACHE_TOO_LARGE", `${label}: a root filesystem of ${size} bytes is more than the ${LIMITS.rootfsBytes}-byte limit`, { hint: "the cache entry is damaged or hostile: nothing was imported" });
    const ix = decodeFileIndex(await this.fetchVerified(desc, LIMITS.fileIndexBytes, label, c), label, { file, size });
    // A squashfs image is dense (compressed): one that is mostly holes would only make this
    // machine hash zeroes for hours under the image store's lock.
    if (file === "rootfs.sqfs" && ix.chunks.length * 2 < Math.ceil(size / CHUNK_SIZE)) {
      throw new CacheError("CACHE_INDEX_INVALID", `${label}: only ${ix.chunks.length} of its ${Math.ceil(size / CHUNK_SIZE)} chunks hold data; a root filesystem is not mostly holes`, { hint: "the cache entry is damaged or hostile: nothing was imported" });
    }
    checkFrames(ix.chunks, parts.packs, label);
    return ix;
  }

  /**
   * Writes `path` (sparse: holes stay holes) from the chunks of `index`: those a local file has
   * are copied, the rest read from their packs. `extra`: one more frame to read on the way (the
   * device state, which lies in the RAM's packs).
   */
  async rebuild(
    path: string,
    index: FileIndex,
    local: LocalChunks,
    packs: Map<string, number>,
    what: string,
    c: Counters,
    id?: { name: string; key: string },
    extra?: { ref: FrameRef; use: (frame: Buffer) => Promise<void> },
  ): Promise<void> {
    // Distinct contents: each read or copied once, written at every offset it appears at.
    const groups = new Map<string, { ref: FrameRef; length: number; offsets: number[] }>();
    for (const ch of index.chunks) {
      const length = chunkLength(index.size, ch.offset);
      const g = groups.get(ch.sha256);
      if (!g) groups.set(ch.sha256, { ref: ch, length, offsets: [ch.offset] });
      else if (g.length !== length) throw new CacheError("CACHE_INDEX_INVALID", `${what}: chunk ${ch.sha256.slice(0, 16)} is listed with two lengths`);
      else g.offsets.push(ch.offset);
    }
    const fh = await open(path, "wx");
    const sources = new Map<string, FileHandle>();
    try {
      await fh.truncate(index.size);
      const out = new RunWriter(fh);
      // A chunk's frame is checked by a transfer worker (decompressed to its exact length, then
      // against its sha256) with the others of its pack; the device state's frame by `use`.
      type Want = FrameWant & ({ use: (frame: Buffer) => Promise<void> } | { chunk: { sha256: string; length: number; offsets: number[] } });
      const byPack = new Map<string, Want[]>();
      const add = (pack: string, w: Want) => {
        let l = byPack.get(pack);
        if (!l) byPack.set(pack, (l = []));
        l.push(w);
      };
      for (const [sha256, g] of groups) {
        this.opts.signal?.throwIfAborted();
        const src = local.get(sha256);
        if (src && src.length === g.length) {
          let h = sources.get(src.file);
          if (!h) sources.set(src.file, (h = await open(src.file, "r")));
          const buf = Buffer.allocUnsafe(g.length);
          const { bytesRead } = await h.read(buf, 0, g.length, src.offset);
          // The local file may have changed since it was hashed: only equal bytes are used.
          if (bytesRead === g.length && sha256hex(buf) === sha256) {
            for (const o of g.offsets) await out.write(buf, o);
            continue;
          }
        }
        add(g.ref.pack, { at: g.ref.at, size: g.ref.size, chunk: { sha256, length: g.length, offsets: g.offsets } });
      }
      if (extra) add(extra.ref.pack, { at: extra.ref.at, size: extra.ref.size, use: extra.use });
      let done = 0;
      const unpack = async (frames: Buffer[], items: Array<{ sha256: string; length: number; offsets: number[] }>) => {
        // In batches of about UNPACK_BATCH compressed bytes, all handed to the workers at once
        // (the pack is in memory anyway): they work in parallel, and writing begins with the first.
        const label = (i: number) => `chunk ${items[i]!.sha256.slice(0, 16)} of ${what}`;
        const batches: Array<{ from: number; to: number; result: Promise<UnpackResult> }> = [];
        for (let from = 0; from < items.length; ) {
          let to = from;
          let bytes = 0;
          while (to < items.length && (to === from || bytes + frames[to]!.length <= UNPACK_BATCH)) bytes += frames[to++]!.length;
          let at = 0;
          const chunks = items.slice(from, to).map((it, i) => {
            const ch = { at, size: frames[from + i]!.length, sha256: it.sha256, length: it.length };
            at += ch.size;
            return ch;
          });
          const first = from;
          const result = unpackChunks(Buffer.concat(frames.slice(from, to), at), chunks, (f, n, i) => decompressBounded(f, label(first + i), { expected: n }));
          result.catch(() => undefined);
          batches.push({ from, to, result });
          from = to;
        }
        for (const b of batches) {
          const r = await b.result;
          if (!r.ok) {
            const i = b.from + r.index;
            const hint = "the cache holds corrupt data; nothing was imported";
            if (r.why === "sha256") throw new CacheError("CACHE_CHUNK_CORRUPT", `${label(i)} does not match the sha256 its index records`, { hint });
            if (r.why === "length") throw new CacheError("CACHE_CHUNK_CORRUPT", `${label(i)}: decompresses to ${r.message} bytes, expected ${items[i]!.length}`, { hint });
            throw new CacheError("CACHE_CHUNK_CORRUPT", `${r.index >= 0 ? label(i) : `a chunk of ${what}`}: cannot be decompressed: ${r.message ?? "not a zstd frame"}`, { hint });
          }
          let pos = 0;
          for (const it of items.slice(b.from, b.to)) {
            const raw = r.raw.subarray(pos, pos + it.length);
            pos += it.length;
            for (const o of it.offsets) await out.write(raw, o);
            c.chunksMoved++;
            if (id && ++done % 256 === 0) this.opts.onProgress?.({ type: "chunks", ...id, done, moved: c.chunksMoved });
          }
        }
      };
      const lanes = new Lanes(Math.max(1, Math.min(4, this.backend.parallelism)));
      for (const [pack, wants] of byPack) {
        this.opts.signal?.throwIfAborted();
        await lanes.run(async () => {
          const frames: Buffer[] = [];
          const items: Array<{ sha256: string; length: number; offsets: number[] }> = [];
          const whole = this.takePrefetched(pack);
          await readFrames(this.backend, pack, packs.get(pack)!, wants, `pack ${pack.slice(7, 19)} of ${what}`, c, async (w, bytes) => {
            const x = w as Want;
            if ("use" in x) return x.use(bytes);
            frames.push(bytes);
            items.push(x.chunk);
          }, whole);
          await unpack(frames, items);
        });
      }
      await lanes.drain();
      await out.flush();
    } finally {
      await fh.close();
      for (const h of sources.values()) await h.close();
    }
  }
}

/** The chunks of a local parent's RAM by sha256: from its checksums file, else by reading it. */
async function parentChunks(parent: LoadedSnapshot): Promise<LocalChunks> {
  const out: LocalChunks = new Map();
  const size = parent.meta.files.ram.size;
  const sums = parent.meta.files.ram.sums ? await readRamSums(join(parent.dir, SNAPSHOT_FILES.sums), parent.meta.files.ram.sums) : "none";
  if (typeof sums !== "string" && sums.chunkSize === CHUNK_SIZE) {
    for (const [i, sha] of sums.chunks) {
      const h = sha.toString("hex");
      if (!out.has(h)) out.set(h, { file: parent.ram, offset: i * CHUNK_SIZE, length: chunkLength(size, i * CHUNK_SIZE) });
    }
    return out;
  }
  return localChunks(parent.ram, size);
}

/**
 * Publishes the root filesystem of image `digest` into the image store when the store lacks it
 * and the cache has a snapshot made on it. Resolves true when it did.
 */
export async function importImage(backend: CacheBackend, digest: string, trust: CacheTrust = []): Promise<boolean> {
  const entryDir = join(homePaths().images, digest.slice("sha256:".length));
  if (await readImageEntry(entryDir, digest)) return false;
  const bytes = await backend.readImageManifest(digest);
  if (!bytes) return false;
  const what = `image ${digest} in cache ${backend.location}`;
  const manifest = parseManifest(bytes, `the manifest carrying ${what}`, "null");
  if (!manifest) {
    log("%s: carried by an artifact of an earlier format; not used", what);
    return false;
  }
  if (manifest.annotations[ANNOTATIONS.image] !== digest) throw new CacheError("CACHE_MANIFEST_INVALID", `the manifest tagged for ${what} is annotated with image ${JSON.stringify(manifest.annotations[ANNOTATIONS.image])}`);
  const session = new ImportSession(backend, homePaths().snapshots, { trust });
  // The image store is shared by every project on this machine: only what a trusted key signed goes in.
  let signed = false;
  try {
    signed = session.signedByTrusted(bytes, `the snapshot carrying ${what}`);
  } catch (err) {
    log("%s: %s; not used", what, (err as Error).message);
  }
  if (!signed) return false;
  const parts = manifestParts(manifest, `the manifest carrying ${what}`);
  const size = Number(parts.rootfsIndex.annotations?.[ANNOTATIONS.size]);
  if (!Number.isSafeInteger(size) || size < 0 || size > LIMITS.rootfsBytes) throw new CacheError("CACHE_MANIFEST_INVALID", `the manifest carrying ${what} does not give the size of the root filesystem`);
  const c: Counters = { chunksMoved: 0, bytesMoved: 0 };
  const index = await session.fileIndex(parts.rootfsIndex, "rootfs.sqfs", size, parts, what, c);
  await installImage(session, digest, parts, index, { publish: true }, what, c);
  return true;
}
