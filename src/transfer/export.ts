/**
 * Export: snapshots of this machine into a cache (directory or registry), in format version 2.
 * A snapshot the cache has (by key) is not read at all. Otherwise its new chunks go into a few
 * packs: a chunk its parent's artifact already holds (read from the parent's config, or from
 * this session when the parent was just exported) or that the root filesystem holds is
 * referenced, not stored again. A child therefore costs one or two packs, its config and its
 * manifest, in a handful of requests whatever its size.
 */
import { createHash } from "node:crypto";
import { open, readFile } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { logger } from "../debug.js";
import { keyOf, stableJson } from "../schema/key.js";
import { METADATA_FILE } from "../store/images.js";
import { readRamSums } from "../store/ram-sums.js";
import { loadSnapshot, rootfsDigest, SNAPSHOT_FILES, type LoadedSnapshot } from "../store/snapshots.js";
import { openCache, type CacheBackend } from "./backend.js";
import { CacheError } from "./errors.js";
import {
  ANNOTATIONS,
  CHUNK_SIZE,
  chunkLength,
  decodeConfig,
  digestOf,
  encodeConfig,
  encodeFileIndex,
  encodeManifest,
  LIMITS,
  manifestParts,
  MEDIA,
  packTarget,
  parseManifest,
  sha256hex,
  toConfig,
  type ArtifactManifest,
  type Descriptor,
  type FileIndex,
  type FrameRef,
  type IndexedChunk,
  type IndexedFile,
} from "./format.js";
import { Lanes } from "./lanes.js";
import { recipeOf } from "./recipes.js";
import { checkSignature, parseTrust, signManifest } from "./sign.js";
import { keepConfigCopy, readConfigCopy } from "./config-memo.js";
import { PackWriter, resolveFrame, type ClosedPack, type PendingFrame } from "./packs.js";
import { fileChunks } from "./files.js";
import { makeReport, type TransferEntry, type TransferOptions, type TransferReport } from "./report.js";
import { type BatchChunk, packChunks, type PackResult } from "./workers.js";
import { compress } from "./zstd.js";

const log = logger("transfer");
/** Bytes of chunks per batch sent to the transfer workers, and how many batches run ahead of the packing. */
const BATCH_BYTES = 2 * 1024 * 1024;
const LOOKAHEAD = 3;

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
    await backend.finish?.();
    return makeReport(backend, entries, t0);
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

/** An image's root filesystem in the cache: its index and metadata blobs and its packs. */
interface RootfsPart {
  image: string;
  sha256: string;
  index: Descriptor;
  meta: Descriptor;
  packs: Descriptor[];
  /** Chunk sha256 → its frame (known only when the rootfs was packed in this session). */
  frames: Map<string, FrameRef>;
}

/** What a later child of an exported (or cached) snapshot can reuse. */
interface ArtifactFacts {
  rootfs: RootfsPart;
  /** RAM chunk sha256 → its frame. */
  frames: Map<string, FrameRef>;
  /** Every pack the artifact lists, by digest. */
  packs: Map<string, Descriptor>;
}

class ExportSession {
  /** Blobs known to be at the destination (or on their way there), by digest: whether this session wrote them. */
  private readonly blobs = new Map<string, Promise<boolean>>();
  private readonly rootfs = new Map<string, Promise<RootfsPart>>();
  private readonly artifacts = new Map<string, ArtifactFacts>();
  /**
   * Recipe keys (src/schema/host.ts) by key, of the snapshots this session exported or found
   * present: a child's recipe names its parent's.
   */
  private readonly recipes = new Map<string, string>();
  /** Manifests read from the cache in this session, by key (undefined: the cache has none). */
  private readonly manifests = new Map<string, Promise<Buffer | undefined>>();
  /**
   * Uploads in flight, at most `parallelism` at once: a snapshot's packs, indexes and config go
   * while the next ones are made, and only its manifest waits for all of them.
   */
  private readonly uploads: Lanes;

  constructor(
    private readonly backend: CacheBackend,
    private readonly opts: TransferOptions,
  ) {
    this.uploads = new Lanes(backend.parallelism);
  }

  /**
   * Writes a blob unless the destination has it: `check` asks the destination first (a blob that
   * may be there from an earlier export); without it the blob is written at once (one only this
   * snapshot has, or one so small that writing it again costs less than asking). Resolves true
   * when it was written now.
   */
  private put(digest: string, data: Buffer, check: boolean): Promise<boolean> {
    const known = this.blobs.get(digest);
    if (known) return known.then(() => false); // counted by whoever put it first
    const p = (async () => {
      if (check && (await this.backend.blobSize(digest)) === data.length) return false;
      await this.backend.writeBlob(digest, data);
      return true;
    })();
    this.blobs.set(digest, p);
    // A failed put is not "known": a retry checks again.
    p.catch(() => this.blobs.delete(digest));
    return p;
  }

  /** Schedules a put in the upload lanes (waiting only for a free lane); counts what it wrote into `c`. */
  private async putLater(digest: string, data: Buffer, check: boolean, c: Counters, frames = 0): Promise<Descriptor> {
    await this.uploads.run(async () => {
      if (await this.put(digest, data, check)) {
        c.bytesMoved += data.length;
        c.chunksMoved += frames;
      }
    });
    return { mediaType: "", digest, size: data.length };
  }

  /** A pack writer whose closed packs are uploaded (missing ones only) in the upload lanes. */
  private packer(target: number, c: Counters, packs: Descriptor[], file: IndexedFile): PackWriter {
    return new PackWriter(target, async (p: ClosedPack) => {
      log("%s pack %s closed: %d bytes, %d frames", file, p.digest.slice(7, 19), p.bytes.length, p.frames);
      packs.push({ mediaType: MEDIA.pack, digest: p.digest, size: p.bytes.length, annotations: { [ANNOTATIONS.file]: file } });
      // A root filesystem's packs are often there already (another snapshot of the image); a
      // snapshot's own pack of more than a MiB may be, from an interrupted export. Asking costs a
      // round trip, not the bytes; a small pack of new chunks is written without asking.
      await this.putLater(p.digest, p.bytes, file === "rootfs.sqfs" || p.bytes.length > 1024 * 1024, c, p.frames);
    });
  }

  /**
   * The image's root filesystem, packed and put once per image whatever the number of snapshots
   * on it. Its packs depend on its bytes alone, so every export of the same image makes the same
   * blobs, and one that finds them in the cache moves nothing.
   */
  private rootfsOf(snap: LoadedSnapshot, c: Counters): Promise<RootfsPart> {
    const digest = snap.meta.image.digest;
    let p = this.rootfs.get(digest);
    if (!p) {
      p = (async () => {
        const path = snap.meta.image.rootfs;
        const size = snap.meta.image.rootfsSize;
        const metaPath = join(dirname(path), METADATA_FILE);
        const metaBytes = await readFile(metaPath).catch((cause: unknown) => {
          throw new CacheError("CACHE_SNAPSHOT_INVALID", `snapshot ${snap.dir}: the metadata of its root filesystem (${metaPath}) cannot be read`, { cause, hint: "rebuild the image (supermachine build --force)" });
        });
        if (metaBytes.length > LIMITS.imageMetaBytes) throw new CacheError("CACHE_TOO_LARGE", `${metaPath} is larger than ${LIMITS.imageMetaBytes} bytes`);
        const packs: Descriptor[] = [];
        const writer = this.packer(packTarget(size), c, packs, "rootfs.sqfs");
        const whole = new WholeHash();
        const pending: Array<{ offset: number; sha256: string; frame: PendingFrame }> = [];
        const seen = new Map<string, PendingFrame>();
        // Chunks are hashed here and compressed in batches by the transfer workers, a few batches
        // ahead; frames go into packs in file order, so the packs are the same on every machine.
        const queued = new Set<string>();
        const batches: Array<{ items: Array<{ offset: number; sha256: string }>; result: Promise<PackResult>; fresh: number }> = [];
        let cur = { parts: [] as Buffer[], bytes: 0, items: [] as Array<{ offset: number; sha256: string }>, chunks: [] as BatchChunk[] };
        const flush = () => {
          if (cur.items.length === 0) return;
          const result = packChunks(Buffer.concat(cur.parts, cur.bytes), cur.chunks);
          result.catch(() => undefined);
          batches.push({ items: cur.items, result, fresh: cur.chunks.length });
          cur = { parts: [], bytes: 0, items: [], chunks: [] };
        };
        const settle = async (keep: number) => {
          while (batches.length > keep) {
            const b = batches.shift()!;
            const r = await b.result;
            if (!r.ok) throw new Error("internal: a root filesystem chunk changed while it was packed");
            let at = 0;
            let i = 0;
            for (const { offset, sha256 } of b.items) {
              let frame = seen.get(sha256);
              if (!frame) {
                const n = r.sizes[i++]!;
                seen.set(sha256, (frame = await writer.add(r.frames.subarray(at, at + n))));
                at += n;
              }
              pending.push({ offset, sha256, frame });
            }
          }
        };
        for await (const { offset, data, zero } of fileChunks(path, size, { all: true })) {
          this.opts.signal?.throwIfAborted();
          whole.update(offset, data);
          if (zero) continue;
          const sha256 = sha256hex(data);
          cur.items.push({ offset, sha256 });
          if (!queued.has(sha256)) {
            queued.add(sha256);
            cur.chunks.push({ at: cur.bytes, size: data.length, sha256: "" });
            cur.parts.push(data);
            cur.bytes += data.length;
          }
          if (cur.bytes >= BATCH_BYTES) {
            flush();
            await settle(LOOKAHEAD);
          }
        }
        flush();
        await settle(0);
        await writer.finish();
        const sha256 = whole.digest(size);
        const recorded = await rootfsDigest(path);
        if (recorded !== undefined && recorded !== sha256) {
          throw new CacheError("CACHE_SNAPSHOT_INVALID", `snapshot ${snap.dir}: its root filesystem ${path} no longer matches the sha256 its image store entry records`, { hint: "supermachine verify --fix; then build again" });
        }
        const chunks: IndexedChunk[] = pending.map((x) => ({ offset: x.offset, sha256: x.sha256, ...resolveFrame(x.frame) }));
        const index: FileIndex = { file: "rootfs.sqfs", size, sha256, chunks };
        const ib = encodeFileIndex(index);
        const indexDesc = await this.putLater(digestOf(ib), ib, true, c);
        const metaDesc = await this.putLater(digestOf(metaBytes), metaBytes, true, c);
        return {
          image: digest,
          sha256,
          index: { ...indexDesc, mediaType: MEDIA.fileIndex, annotations: { [ANNOTATIONS.file]: "rootfs.sqfs", [ANNOTATIONS.size]: String(size), [ANNOTATIONS.sha256]: sha256 } },
          meta: { ...metaDesc, mediaType: MEDIA.imageMeta, annotations: { [ANNOTATIONS.file]: METADATA_FILE } },
          packs,
          frames: new Map(chunks.map((ch) => [ch.sha256, { pack: ch.pack, at: ch.at, size: ch.size }])),
        };
      })();
      this.rootfs.set(digest, p);
      p.catch(() => this.rootfs.delete(digest));
    }
    return p;
  }

  /** The cache's manifest of snapshot `key` (read once per session). */
  private manifestOf(key: string): Promise<Buffer | undefined> {
    let p = this.manifests.get(key);
    if (!p) {
      p = this.backend.readManifest(key);
      this.manifests.set(key, p);
      p.catch(() => this.manifests.delete(key));
    }
    return p;
  }

  /**
   * Whether the cache has snapshot `key` as this export would write it: a version 2 artifact,
   * and with a signing key, one this key signed. An entry someone else wrote is exported again
   * from this machine's bytes (and signed), never re-signed as it is.
   */
  private async present(key: string): Promise<boolean> {
    if (this.artifacts.has(key)) return true;
    const bytes = await this.manifestOf(key);
    if (!bytes) return false;
    const what = `snapshot ${key.slice(0, 16)} in cache ${this.backend.location}`;
    try {
      const m = parseManifest(bytes, what, "null");
      if (!m || m.annotations[ANNOTATIONS.key] !== key) return false;
    } catch (err) {
      log("%s: unreadable (%s): exported again", what, (err as Error).message);
      return false;
    }
    const signer = this.opts.signingKey;
    if (!signer) return true;
    try {
      if (checkSignature(bytes, parseTrust([signer.publicKey], "the signing key"), what).signedBy === signer.id) return true;
    } catch {
      // not signed by this key
    }
    log("%s: present but not signed by key %s: exported again", what, signer.id);
    return false;
  }

  /**
   * What the cache's artifact of `key` offers a child: its packs and where each of its RAM
   * chunks is. Nothing read here is trusted for content: a child only references a frame for a
   * chunk whose sha256 it computed itself, and every importer checks each frame against it.
   */
  private async cachedArtifact(key: string): Promise<ArtifactFacts | undefined> {
    const known = this.artifacts.get(key);
    if (known) return known;
    try {
      const bytes = await this.manifestOf(key);
      if (!bytes) return undefined;
      const what = `snapshot ${key.slice(0, 16)} in cache ${this.backend.location}`;
      const m = parseManifest(bytes, what, "null");
      if (!m || m.annotations[ANNOTATIONS.key] !== key) return undefined;
      const parts = manifestParts(m, what);
      const memo = await readConfigCopy(m.config.digest, m.config.size);
      const configBytes = memo ?? (await this.backend.readBlob(m.config.digest, Math.min(m.config.size, LIMITS.configBytes), what));
      if (!configBytes || digestOf(configBytes) !== m.config.digest) return undefined;
      if (!memo) await keepConfigCopy(m.config.digest, configBytes);
      const config = decodeConfig(configBytes, `the config of ${what}`);
      const packs = new Map(m.layers.filter((l) => l.mediaType === MEDIA.pack).map((l) => [l.digest, l]));
      const frames = new Map<string, FrameRef>();
      for (const ch of config.ram.chunks) if (parts.packs.has(ch.pack)) frames.set(ch.sha256, { pack: ch.pack, at: ch.at, size: ch.size });
      const rootfsPacks = m.layers.filter((l) => l.mediaType === MEDIA.pack && l.annotations?.[ANNOTATIONS.file] === "rootfs.sqfs");
      const image = m.annotations[ANNOTATIONS.image] ?? "";
      const sha256 = parts.rootfsIndex.annotations?.[ANNOTATIONS.sha256] ?? "";
      const facts = { rootfs: { image, sha256, index: parts.rootfsIndex, meta: parts.imageMeta, packs: rootfsPacks, frames: new Map() }, frames, packs };
      this.artifacts.set(key, facts);
      return facts;
    } catch (err) {
      // A parent the cache cannot give back is not reused: the child then carries its own chunks.
      log("parent %s in %s not reused: %s", key.slice(0, 16), this.backend.location, (err as Error).message);
      return undefined;
    }
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
    // Its own entry and its parent's are asked for at once (one round trip, not two), while the
    // upload sessions for its config and first pack are started: a snapshot the cache has leaves
    // them to the next one (the session cancels what is left at its end).
    this.backend.prepareUploads?.(2);
    const parentKey = meta.inputs.parent;
    const [present, parent] = await Promise.all([this.present(key), parentKey ? this.cachedArtifact(parentKey) : undefined]);
    const recipeKey = await recipeOf(snap, this.recipes, (k) => this.manifestOf(k), this.backend.location);
    if (recipeKey) this.recipes.set(key, recipeKey);
    if (present) {
      log("%s (%s): already in %s", name, key, this.backend.location);
      return this.done({ name, key, status: "present", chunks: 0, chunksMoved: 0, bytesMoved: 0 });
    }
    const t0 = performance.now();
    const c: Counters = { chunksMoved: 0, bytesMoved: 0 };
    // The root filesystem: the parent's when it is this image's with the same bytes, else packed here.
    const localSha = meta.image.rootfsSha256 ?? (await rootfsDigest(meta.image.rootfs));
    // Packed (by the transfer workers) and uploaded while the RAM is: nothing of the RAM depends on it.
    const rootfsP = parent && parent.rootfs.image === meta.image.digest && localSha !== undefined && parent.rootfs.sha256 === localSha ? Promise.resolve(parent.rootfs) : this.rootfsOf(snap, c);
    rootfsP.catch(() => undefined); // awaited below, or settled before a failure of the RAM's is thrown
    try {
      return await this.exportRam(snap, parent, rootfsP, c, t0, recipeKey);
    } catch (err) {
      await rootfsP.catch(() => undefined);
      throw err;
    }
  }

  private async exportRam(snap: LoadedSnapshot, parent: ArtifactFacts | undefined, rootfsP: Promise<RootfsPart>, c: Counters, t0: number, recipeKey: string | undefined): Promise<TransferEntry> {
    const meta = snap.meta;
    const key = meta.hash;
    const name = snapshotName(snap);

    const sums = await readRamSums(join(snap.dir, SNAPSHOT_FILES.sums), meta.files.ram.sums);
    if (typeof sums === "string") throw new CacheError("CACHE_SNAPSHOT_INVALID", `snapshot ${snap.dir} is damaged: ${sums}; it was not exported`, { hint: "build it again (supermachine build) before exporting" });
    const refuse = (why: string) =>
      new CacheError("CACHE_SNAPSHOT_INVALID", `snapshot ${snap.dir} is damaged: its RAM differs from its checksums ${why}; it was not exported`, {
        hint: "supermachine verify --fix quarantines it; build it again (supermachine build) before exporting",
      });
    const ownPacks: Descriptor[] = [];
    const writer = this.packer(packTarget(meta.files.ram.size), c, ownPacks, "ram");
    // A RAM chunk equal to one of its parent's RAM is referenced there. The root filesystem's
    // chunks are not looked at: they almost never equal a RAM chunk (measured: 1 of 2,055 for
    // busybox, 0 of 3,617 for python), and one that did would make an importer fetch a range of
    // a root filesystem pack besides the whole pack.
    const reused = (sha: string): FrameRef | undefined => parent?.frames.get(sha);
    const own = new Map<string, PendingFrame>();
    const pending: Array<{ offset: number; sha256: string; frame: FrameRef | PendingFrame }> = [];
    let read = 0;
    const add = async (offset: number, sha256: string, data: () => Promise<Buffer>) => {
      let frame: FrameRef | PendingFrame | undefined = reused(sha256) ?? own.get(sha256);
      if (!frame) {
        const f = await writer.add(compress(await data()));
        own.set(sha256, f);
        frame = f;
      }
      pending.push({ offset, sha256, frame });
      if (++read % 256 === 0) this.opts.onProgress?.({ type: "chunks", name, key, done: read, moved: own.size });
    };
    if (sums.chunkSize === CHUNK_SIZE) {
      // The RAM's checksums name every non-zero chunk: only the chunks no listed pack holds are
      // read (holes never are), each checked against its checksum before it is packed.
      const list = [...sums.chunks].map(([i, sum]) => ({ offset: i * CHUNK_SIZE, sha256: sum.toString("hex") }));
      // Which chunks must be read (the first of each content no listed pack holds), read in runs
      // of adjacent chunks: a few large reads rather than one per chunk.
      const seen = new Set<string>();
      const need = list.map((x) => !reused(x.sha256) && !seen.has(x.sha256) && seen.add(x.sha256) !== undefined);
      const size = meta.files.ram.size;
      // Runs of adjacent chunks to read go to the transfer workers, which check each against its
      // checksum and compress it, a few runs ahead of the packing (in RAM order) here.
      const jobs: Array<{ start: number; end: number; ks: number[]; result?: Promise<PackResult> }> = [];
      for (let k = 0; k < list.length; k++) {
        if (!need[k]) continue;
        const { offset } = list[k]!;
        const len = chunkLength(size, offset);
        const last = jobs[jobs.length - 1];
        if (last && last.end === offset && last.end - last.start < BATCH_BYTES) {
          last.end += len;
          last.ks.push(k);
        } else jobs.push({ start: offset, end: offset + len, ks: [k] });
      }
      const fh = await open(snap.ram, "r");
      const submit = async (j: (typeof jobs)[number]): Promise<PackResult> => {
        const buf = Buffer.allocUnsafe(j.end - j.start);
        const { bytesRead } = await fh.read(buf, 0, buf.length, j.start);
        if (bytesRead !== buf.length) throw refuse(`(it ends before offset ${j.end})`);
        return packChunks(buf, j.ks.map((k) => ({ at: list[k]!.offset - j.start, size: chunkLength(size, list[k]!.offset), sha256: list[k]!.sha256 })));
      };
      let submitted = 0;
      const ahead = (from: number) => {
        for (; submitted < jobs.length && submitted <= from + LOOKAHEAD; submitted++) {
          const j = jobs[submitted]!;
          j.result = submit(j);
          j.result.catch(() => undefined);
        }
      };
      try {
        let ji = 0;
        let pos = 0;
        let at = 0;
        for (let k = 0; k < list.length; k++) {
          this.opts.signal?.throwIfAborted();
          const { offset, sha256 } = list[k]!;
          let frame: FrameRef | PendingFrame | undefined;
          if (need[k]) {
            const j = jobs[ji]!;
            ahead(ji);
            const r = await j.result!;
            if (!r.ok) throw refuse(`at offset ${list[j.ks[r.index]!]!.offset}`);
            const n = r.sizes[pos]!;
            frame = await writer.add(r.frames.subarray(at, at + n));
            own.set(sha256, frame);
            at += n;
            if (++pos === j.ks.length) {
              j.result = undefined; // its frames are in the packs now
              ji++;
              pos = 0;
              at = 0;
            }
          } else frame = reused(sha256) ?? own.get(sha256);
          if (!frame) throw new Error(`internal: no frame for the chunk at ${offset}`);
          pending.push({ offset, sha256, frame });
          if (++read % 256 === 0) this.opts.onProgress?.({ type: "chunks", name, key, done: read, moved: own.size });
        }
      } finally {
        // Reads still in flight finish before the file closes.
        await Promise.all(jobs.slice(0, submitted).map((j) => j.result?.catch(() => undefined)));
        await fh.close();
      }
    } else {
      for await (const { offset, data } of fileChunks(snap.ram, meta.files.ram.size)) {
        this.opts.signal?.throwIfAborted();
        await add(offset, sha256hex(data), async () => data);
      }
    }
    const stateBytes = await readFile(snap.state);
    if (stateBytes.length !== meta.files.state.size || sha256hex(stateBytes) !== meta.files.state.sha256) throw new CacheError("CACHE_SNAPSHOT_INVALID", `snapshot ${snap.dir} is damaged: its device state differs from its metadata; it was not exported`, { hint: "build it again (supermachine build) before exporting" });
    const stateFrame = await writer.add(compress(stateBytes));
    await writer.finish();

    const ramChunks: IndexedChunk[] = pending.map((x) => ({ offset: x.offset, sha256: x.sha256, ...("slot" in x.frame ? resolveFrame(x.frame) : x.frame) }));
    const ram: FileIndex = { file: "ram", size: meta.files.ram.size, chunks: ramChunks };
    const state = { ...resolveFrame(stateFrame), length: stateBytes.length, sha256: meta.files.state.sha256 };
    const configBytes = encodeConfig({ snapshot: toConfig(meta), state, ram });
    // The config goes while the packs still upload; the manifest, which names them all, waits.
    const configDesc = await this.putLater(digestOf(configBytes), configBytes, false, c);
    await keepConfigCopy(configDesc.digest, configBytes);
    // The root filesystem packed (its last puts scheduled), then every upload finished.
    const rootfs = await rootfsP;
    await this.uploads.drain();

    // Layers: the root filesystem's, then every pack of the parent (in its order: a registry's
    // garbage collection then keeps all a chain needs), then this snapshot's own.
    const layers: Descriptor[] = [rootfs.index, rootfs.meta, ...rootfs.packs];
    const listed = new Set(layers.map((l) => l.digest));
    for (const d of [...(parent?.packs.values() ?? []), ...ownPacks]) {
      if (listed.has(d.digest)) continue;
      listed.add(d.digest);
      layers.push(d);
    }
    for (const ref of [...ramChunks, state]) if (!listed.has(ref.pack)) throw new Error(`internal: pack ${ref.pack} of ${name} is not listed`);
    const manifest: ArtifactManifest = {
      schemaVersion: 2,
      mediaType: MEDIA.manifest,
      artifactType: MEDIA.artifact,
      config: { ...configDesc, mediaType: MEDIA.config },
      layers,
      annotations: {
        [ANNOTATIONS.key]: key,
        [ANNOTATIONS.name]: name,
        ...(meta.inputs.parent ? { [ANNOTATIONS.parent]: meta.inputs.parent } : {}),
        [ANNOTATIONS.engine]: stableJson(meta.inputs.engine),
        ...(recipeKey ? { [ANNOTATIONS.recipe]: recipeKey } : {}),
        [ANNOTATIONS.image]: meta.image.digest,
        [ANNOTATIONS.created]: meta.created,
      },
    };
    const bytes = encodeManifest(this.opts.signingKey ? signManifest(manifest, this.opts.signingKey) : manifest);
    if (bytes.length > LIMITS.manifestBytes) {
      throw new CacheError("CACHE_TOO_LARGE", `the manifest of snapshot ${name} would be ${bytes.length} bytes (${layers.length} layers), more than registries take (${LIMITS.manifestBytes})`, { hint: "the chain of parents is too deep for one manifest; bake the image from a shallower parent" });
    }
    const tagImage = !(parent && parent.rootfs.image === meta.image.digest);
    await this.backend.writeManifest(key, bytes, manifest, { tagImage, recipeKey });
    c.bytesMoved += bytes.length;
    this.artifacts.set(key, { rootfs, frames: new Map(ramChunks.map((ch) => [ch.sha256, { pack: ch.pack, at: ch.at, size: ch.size }])), packs: new Map(layers.filter((l) => l.mediaType === MEDIA.pack).map((l) => [l.digest, l])) });
    const distinct = new Set(ramChunks.map((ch) => ch.sha256)).size + (rootfs.frames.size || 0);
    log("%s (%s): exported to %s in %d ms: %d new chunks in %d packs, %d bytes", name, key, this.backend.location, Math.round(performance.now() - t0), c.chunksMoved, ownPacks.length, c.bytesMoved);
    return this.done({ name, key, status: "exported", chunks: distinct, ...c });
  }

  private done(entry: TransferEntry): TransferEntry {
    this.opts.onProgress?.({ type: "done", entry });
    return entry;
  }
}

/** The sha256 of a whole file read in order, its holes included. */
class WholeHash {
  private readonly h = createHash("sha256");
  private pos = 0;
  update(offset: number, data: Buffer): void {
    if (offset !== this.pos) throw new Error(`internal: read ${offset} after ${this.pos}`);
    this.h.update(data);
    this.pos += data.length;
  }
  digest(size: number): string {
    if (this.pos !== size) throw new Error(`internal: hashed ${this.pos} of ${size} bytes`);
    return this.h.digest("hex");
  }
}
