/**
 * The snapshot artifact format, version 2 (docs/cache-format.md): a snapshot is an OCI image
 * manifest whose config blob carries the snapshot's metadata, where its device state is and the
 * index of its guest RAM, and whose layers are the image's root filesystem index and metadata
 * and the packs: blobs of concatenated zstd frames, one per 16 KiB chunk. A child lists its
 * parent's packs and adds packs of its own new chunks only. Everything read back is untrusted:
 * every parser here bounds what it reads and checks shape, stopping at the first error.
 */
import { isValidDigest } from "../oci/oci-layout.js";
import { CHUNK_SIZE, sha256hex } from "../store/chunks.js";
import { META_VERSION, type SnapshotMeta } from "../store/snapshots.js";
import { CacheError, type CacheErrorCode } from "./errors.js";
import { compress, decompressBounded } from "./zstd.js";

export { CHUNK_SIZE, sha256hex };
export const FORMAT_VERSION = 2;

export const MEDIA = {
  manifest: "application/vnd.oci.image.manifest.v1+json",
  index: "application/vnd.oci.image.index.v1+json",
  artifact: "application/vnd.supermachine.snapshot.v2",
  config: "application/vnd.supermachine.snapshot.config.v2+json+zstd",
  fileIndex: "application/vnd.supermachine.file-index.v2+json+zstd",
  imageMeta: "application/vnd.supermachine.image.v1+json",
  pack: "application/vnd.supermachine.pack.v2",
} as const;

/** Artifact types of earlier versions, recognized only to refuse them by name. */
export const OLD_ARTIFACTS: Record<string, number> = { "application/vnd.supermachine.snapshot.v1": 1 };

export const ANNOTATIONS = {
  key: "dev.supermachine.key",
  name: "dev.supermachine.name",
  parent: "dev.supermachine.parent",
  engine: "dev.supermachine.engine",
  /** The snapshot's recipe key: its key without the host's part (src/schema/host.ts). */
  recipe: "dev.supermachine.recipe",
  image: "dev.supermachine.image.digest",
  file: "dev.supermachine.file",
  size: "dev.supermachine.size",
  sha256: "dev.supermachine.sha256",
  refName: "org.opencontainers.image.ref.name",
  created: "org.opencontainers.image.created",
} as const;

/** Upper bounds for what is read from a cache before it is parsed. */
export const LIMITS = {
  /** Registries commonly refuse manifests above 4 MiB; ours stay near a few KiB. */
  manifestBytes: 4 * 1024 * 1024,
  manifestLayers: 4096,
  /** The config blob (compressed) and what it decompresses to. */
  configBytes: 64 * 1024 * 1024,
  configJsonBytes: 128 * 1024 * 1024,
  layoutIndexBytes: 64 * 1024 * 1024,
  imageMetaBytes: 4 * 1024 * 1024,
  /** A file index (compressed) and what it decompresses to. */
  fileIndexBytes: 64 * 1024 * 1024,
  fileIndexJsonBytes: 128 * 1024 * 1024,
  packBytes: 1024 * 1024 * 1024,
  stateBytes: 1024 * 1024 * 1024,
  /** Guest RAM (a sparse file: only its chunks take space). */
  ramBytes: 2 ** 40,
  /** A root filesystem (checked before it is rebuilt or hashed). */
  rootfsBytes: 64 * 1024 ** 3,
} as const;

/** The tag (registry) and ref name (directory) of a snapshot. */
export const tagOf = (key: string): string => `sm-${key}`;
/** The tag that points at an artifact carrying the root filesystem of an image (by manifest digest). */
export const imageTagOf = (digest: string): string => `sm-image-${digest.slice("sha256:".length)}`;
/** The tag that points at the snapshot last exported under a recipe key (the same image, any host). */
export const recipeTagOf = (recipeKey: string): string => `sm-recipe-${recipeKey}`;

export const KEY_RE = /^[0-9a-f]{64}$/;
const HEX64 = KEY_RE;

export const digestOf = (b: Uint8Array): string => `sha256:${sha256hex(b)}`;

/** The most a chunk's zstd frame may take (zstd's worst case, with room to spare). */
export const maxFrameSize = (length: number): number => length + (length >> 7) + 1024;

// ---- packs ------------------------------------------------------------------------------------

/**
 * The size a pack is closed at: 16 MiB, or more for a file so large that 16 MiB packs would make
 * more than about 48 of them (a manifest stays near 100 layers whatever the guest's size).
 * At 16 MiB a request's fixed cost (a few round trips) is a few percent of its transfer even on a
 * 20 ms link, and a pack is small enough to hold in memory per upload lane and to resend whole.
 */
export const PACK_TARGET = 16 * 1024 * 1024;
export function packTarget(fileSize: number): number {
  const mib = 1024 * 1024;
  return Math.min(512 * mib, Math.max(PACK_TARGET, Math.ceil(fileSize / 48 / mib) * mib));
}

/** Where a zstd frame is: in pack `pack` (a digest) at byte `at`, `size` bytes long. */
export interface FrameRef {
  pack: string;
  at: number;
  size: number;
}

// ---- file index -------------------------------------------------------------------------------

export type IndexedFile = "ram" | "rootfs.sqfs";

export interface IndexedChunk extends FrameRef {
  offset: number;
  /** sha256 (hex) of the chunk's uncompressed bytes. */
  sha256: string;
}

/**
 * Where every non-zero 16 KiB chunk of a file is, in ascending offset order. All-zero chunks are
 * holes. Equal chunks share one frame.
 */
export interface FileIndex {
  file: IndexedFile;
  size: number;
  /** The whole file's sha256 (hex), when known (always for a root filesystem). */
  sha256?: string;
  chunks: IndexedChunk[];
}

/** The uncompressed length of the chunk at `offset`: the last one may be short. */
export const chunkLength = (size: number, offset: number): number => Math.min(CHUNK_SIZE, size - offset);

/** Bytes per chunk record: chunk number, pack number, at, size (u32 LE each), sha256 (32 bytes). */
export const RECORD_BYTES = 48;

/**
 * The JSON form: a table of packs, and the chunks as one base64 string of fixed 48-byte records
 * (a few objects to parse whatever the file's size, so a hostile index cannot make millions).
 */
interface FileIndexJson {
  version: 2;
  file: IndexedFile;
  size: number;
  chunkSize: number;
  sha256?: string;
  packs: string[];
  chunks: string;
}

export function fileIndexJson(ix: FileIndex): FileIndexJson {
  const packs: string[] = [];
  const slot = new Map<string, number>();
  const records = Buffer.alloc(ix.chunks.length * RECORD_BYTES);
  ix.chunks.forEach((c, i) => {
    let n = slot.get(c.pack);
    if (n === undefined) slot.set(c.pack, (n = packs.push(c.pack) - 1));
    const o = i * RECORD_BYTES;
    records.writeUInt32LE(c.offset / CHUNK_SIZE, o);
    records.writeUInt32LE(n, o + 4);
    records.writeUInt32LE(c.at, o + 8);
    records.writeUInt32LE(c.size, o + 12);
    records.write(c.sha256, o + 16, "hex");
  });
  return { version: FORMAT_VERSION, file: ix.file, size: ix.size, chunkSize: CHUNK_SIZE, ...(ix.sha256 ? { sha256: ix.sha256 } : {}), packs, chunks: records.toString("base64") };
}

export const encodeFileIndex = (ix: FileIndex): Buffer => compress(Buffer.from(JSON.stringify(fileIndexJson(ix))));

/** The most a file index of a file of `size` bytes (and its table of packs) can take as JSON. */
const maxIndexJson = (size: number): number => 4096 + LIMITS.manifestLayers * 80 + Math.ceil((Math.ceil(size / CHUNK_SIZE) * RECORD_BYTES * 4) / 3) + 4;

export function decodeFileIndex(blob: Buffer, what: string, expect: { file: IndexedFile; size: number }): FileIndex {
  const max = Math.min(LIMITS.fileIndexJsonBytes, maxIndexJson(expect.size));
  const raw = parseJsonBytes(decompressBounded(blob, what, { max }), what, "CACHE_INDEX_INVALID");
  return checkFileIndex(raw, what, expect);
}

/** Validates a file index, stopping at the first error. */
export function checkFileIndex(raw: unknown, what: string, expect: { file: IndexedFile; size: number }): FileIndex {
  const bad = (why: string) => new CacheError("CACHE_INDEX_INVALID", `${what} is not valid: ${why}`, { hint: "the cache entry is damaged or was written by another version: export the snapshot again" });
  if (!isObject(raw)) throw bad("not an object");
  if (raw.version !== FORMAT_VERSION) throw bad(`version ${JSON.stringify(raw.version)}, expected ${FORMAT_VERSION}`);
  if (raw.file !== expect.file || raw.size !== expect.size) throw bad(`it describes ${JSON.stringify(raw.file)} of ${JSON.stringify(raw.size)} bytes, expected ${expect.file} of ${expect.size}`);
  if (raw.chunkSize !== CHUNK_SIZE) throw bad(`chunk size ${JSON.stringify(raw.chunkSize)}, expected ${CHUNK_SIZE}`);
  if (raw.sha256 !== undefined && !(typeof raw.sha256 === "string" && HEX64.test(raw.sha256))) throw bad("sha256 is not 64 hex digits");
  const packs = raw.packs;
  if (!Array.isArray(packs) || packs.length > LIMITS.manifestLayers) throw bad(`packs is not a list of at most ${LIMITS.manifestLayers}`);
  for (const p of packs) if (!isValidDigest(p)) throw bad(`pack ${JSON.stringify(p)} is not a sha256 digest`);
  const most = Math.ceil(expect.size / CHUNK_SIZE);
  if (typeof raw.chunks !== "string" || raw.chunks.length > Math.ceil((most * RECORD_BYTES * 4) / 3) + 4) throw bad(`chunks is not a base64 string of at most ${most} records (one per chunk of the file)`);
  const records = Buffer.from(raw.chunks, "base64");
  if (records.length % RECORD_BYTES !== 0 || records.length / RECORD_BYTES > most) throw bad(`chunks does not hold whole ${RECORD_BYTES}-byte records, at most one per chunk of the file`);
  const n = records.length / RECORD_BYTES;
  const chunks: IndexedChunk[] = new Array(n);
  let last = -1;
  for (let i = 0; i < n; i++) {
    const o = i * RECORD_BYTES;
    const num = records.readUInt32LE(o);
    const pack = records.readUInt32LE(o + 4);
    const at = records.readUInt32LE(o + 8);
    const size = records.readUInt32LE(o + 12);
    const offset = num * CHUNK_SIZE;
    if (num <= last || offset >= expect.size) throw bad(`chunk record ${i}: chunk ${num} is not inside the file, after the one before`);
    if (pack >= packs.length) throw bad(`chunk record ${i}: pack ${pack} is not in the table of packs`);
    if (size === 0 || size > maxFrameSize(chunkLength(expect.size, offset))) throw bad(`chunk record ${i}: size ${size} is not what a chunk's frame can take`);
    chunks[i] = { offset, pack: packs[pack] as string, at, size, sha256: records.toString("hex", o + 16, o + RECORD_BYTES) };
    last = num;
  }
  return { file: expect.file, size: expect.size, ...(typeof raw.sha256 === "string" ? { sha256: raw.sha256 } : {}), chunks };
}

// ---- the config blob ---------------------------------------------------------------------------

/** meta.json as it travels: without the machine-local path of the root filesystem. */
export type SnapshotConfig = Omit<SnapshotMeta, "image"> & { image: Omit<SnapshotMeta["image"], "rootfs"> };

export function toConfig(meta: SnapshotMeta): SnapshotConfig {
  const { rootfs: _local, ...image } = meta.image;
  return { ...meta, image };
}

/** The device state: one frame in a pack. */
export interface StateRef extends FrameRef {
  /** Uncompressed length and sha256 (hex). */
  length: number;
  sha256: string;
}

/** What the config blob holds: the snapshot's metadata, its state's frame, and its RAM's index. */
export interface ArtifactConfig {
  snapshot: SnapshotConfig;
  state: StateRef;
  ram: FileIndex;
}

export function encodeConfig(c: ArtifactConfig): Buffer {
  return compress(Buffer.from(JSON.stringify({ version: FORMAT_VERSION, snapshot: c.snapshot, state: c.state, ram: fileIndexJson(c.ram) })));
}

/**
 * Parses a config blob. `vet` sees the snapshot's metadata first (its key, engine and sizes can
 * be checked there), before the RAM index, which is then bounded by the RAM size it declares.
 */
export function decodeConfig(blob: Buffer, what: string, vet: (snapshot: SnapshotConfig) => void = () => undefined): ArtifactConfig {
  const raw = parseJsonBytes(decompressBounded(blob, what, { max: LIMITS.configJsonBytes }), what, "CACHE_CONFIG_INVALID");
  const bad = (why: string) => new CacheError("CACHE_CONFIG_INVALID", `${what} is not valid: ${why}`, { hint: "the cache entry is damaged or was written by another version: export the snapshot again" });
  if (!isObject(raw)) throw bad("not an object");
  if (raw.version !== FORMAT_VERSION) throw bad(`version ${JSON.stringify(raw.version)}, expected ${FORMAT_VERSION}`);
  const snapshot = checkSnapshotConfig(raw.snapshot, bad);
  vet(snapshot);
  const s = raw.state;
  if (!isObject(s) || !isValidDigest(s.pack) || !isCount(s.at) || !isCount(s.size) || !isCount(s.length) || typeof s.sha256 !== "string" || !HEX64.test(s.sha256)) throw bad("state is not { pack, at, size, length, sha256 }");
  if (s.length !== snapshot.files.state.size || s.sha256 !== snapshot.files.state.sha256) throw bad("its state's length or sha256 differs from the snapshot's metadata");
  if (s.size > maxFrameSize(s.length)) throw bad(`the state's frame of ${s.size} bytes is more than ${s.length} bytes can take`);
  const ram = checkFileIndex(raw.ram, `the RAM index in ${what}`, { file: "ram", size: snapshot.files.ram.size });
  return { snapshot, state: { pack: s.pack as string, at: s.at, size: s.size, length: s.length, sha256: s.sha256 }, ram };
}

const isOptionalText = (v: unknown, max: number): boolean => v === undefined || (typeof v === "string" && v.length <= max);

function checkSnapshotConfig(raw: unknown, bad: (why: string) => CacheError): SnapshotConfig {
  if (!isObject(raw)) throw bad("snapshot is not an object");
  if (raw.version !== META_VERSION) throw bad(`snapshot.version ${JSON.stringify(raw.version)}, expected ${META_VERSION}`);
  if (typeof raw.hash !== "string" || !HEX64.test(raw.hash)) throw bad("snapshot.hash is not a key");
  const inputs = raw.inputs;
  if (!isObject(inputs)) throw bad("snapshot.inputs is not an object");
  if (inputs.parent !== null && !(typeof inputs.parent === "string" && HEX64.test(inputs.parent))) throw bad("snapshot.inputs.parent is not a key or null");
  if (inputs.manifestDigest !== null && !isValidDigest(inputs.manifestDigest)) throw bad("snapshot.inputs.manifestDigest is not a digest or null");
  if (!isCount(inputs.memoryMib) || !isCount(inputs.vcpus)) throw bad("snapshot.inputs.memoryMib or vcpus is not a count");
  const e = inputs.engine;
  if (!isObject(e) || typeof e.qemu !== "string" || (e.accel !== "kvm" && e.accel !== "tcg") || typeof e.kernelKey !== "string" || typeof e.agentKey !== "string" || typeof e.agentVersion !== "string") throw bad("snapshot.inputs.engine is not an engine fingerprint");
  // machine, cpu and cpuFlags came later: an entry without them is read, and then refused by the
  // engine check as another host's (SNAPSHOT_HOST_MISMATCH), never taken for this one's.
  if (!isOptionalText(e.machine, 256) || !isOptionalText(e.cpu, 1024)) throw bad("snapshot.inputs.engine.machine or cpu is not a string");
  if (e.cpuFlags !== undefined && !(Array.isArray(e.cpuFlags) && e.cpuFlags.length <= 4096 && e.cpuFlags.every((f) => typeof f === "string" && f.length <= 64))) throw bad("snapshot.inputs.engine.cpuFlags is not a list of CPU flags");
  const sources = raw.sources;
  if (sources !== undefined && !(isObject(sources) && typeof sources.name === "string" && sources.name.length <= 256)) throw bad("snapshot.sources is not { name }");
  const image = raw.image;
  if (!isObject(image) || typeof image.ref !== "string" || !isValidDigest(image.digest) || !isObject(image.config) || !isCount(image.rootfsSize)) throw bad("snapshot.image is not { ref, digest, config, rootfsSize }");
  if (image.rootfsSize > LIMITS.rootfsBytes) throw bad(`snapshot.image.rootfsSize ${image.rootfsSize} is more than ${LIMITS.rootfsBytes}`);
  if (!isCount(raw.memoryMib) || !isCount(raw.vcpus)) throw bad("snapshot.memoryMib or vcpus is not a count");
  const f = raw.files;
  if (!isObject(f) || !isObject(f.ram) || !isCount(f.ram.size) || !isObject(f.state) || !isCount(f.state.size) || typeof f.state.sha256 !== "string" || !HEX64.test(f.state.sha256)) throw bad("snapshot.files is not { ram: { size }, state: { size, sha256 } }");
  if (f.ram.size > LIMITS.ramBytes || f.state.size > LIMITS.stateBytes) throw bad("snapshot.files declares a RAM or state size beyond the limits");
  if (typeof raw.workloadRunning !== "boolean" || typeof raw.created !== "string" || typeof raw.bakeMs !== "number") throw bad("snapshot.workloadRunning, created or bakeMs is missing");
  const out = raw as unknown as SnapshotConfig & { image: { rootfs?: unknown } };
  if ("rootfs" in out.image) delete out.image.rootfs; // never trust a path from elsewhere
  return out;
}

// ---- the manifest ------------------------------------------------------------------------------

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}

export interface ArtifactManifest {
  schemaVersion: 2;
  mediaType: typeof MEDIA.manifest;
  artifactType: typeof MEDIA.artifact;
  config: Descriptor;
  layers: Descriptor[];
  annotations: Record<string, string>;
}

/** The manifest's bytes: a fixed key order, so the same content always makes the same digest. */
export const encodeManifest = (m: ArtifactManifest): Buffer => Buffer.from(JSON.stringify(m));

/**
 * Parses a manifest read from a cache. A manifest of an earlier format version is refused by
 * name (CACHE_FORMAT_VERSION); `null` is returned instead when `old: "null"` (an exporter
 * replaces such an entry).
 */
export function parseManifest(bytes: Buffer, what: string): ArtifactManifest;
export function parseManifest(bytes: Buffer, what: string, old: "null"): ArtifactManifest | null;
export function parseManifest(bytes: Buffer, what: string, old?: "null"): ArtifactManifest | null {
  const raw = parseJsonBytes(bytes, what, "CACHE_MANIFEST_INVALID");
  const bad = (why: string) => new CacheError("CACHE_MANIFEST_INVALID", `${what} is not valid: ${why}`, { hint: "the cache entry is damaged or was written by another program: export the snapshot again" });
  if (!isObject(raw)) throw bad("not an object");
  const version = typeof raw.artifactType === "string" ? OLD_ARTIFACTS[raw.artifactType] : undefined;
  if (version !== undefined) {
    if (old === "null") return null;
    throw new CacheError("CACHE_FORMAT_VERSION", `${what} is in cache format version ${version}; this version of supermachine reads version ${FORMAT_VERSION} only`, {
      hint: "export the snapshot again with this version (supermachine cache export, or build --cache-to): it replaces the old entry under the same key",
    });
  }
  if (raw.schemaVersion !== 2 || raw.mediaType !== MEDIA.manifest) throw bad("not an OCI image manifest (schemaVersion 2)");
  if (raw.artifactType !== MEDIA.artifact) throw bad(`artifact type ${JSON.stringify(raw.artifactType)}, expected ${MEDIA.artifact}`);
  const config = checkDescriptor(raw.config, "config", bad);
  if (config.mediaType !== MEDIA.config) throw bad(`its config has media type ${JSON.stringify(config.mediaType)}, expected ${MEDIA.config}`);
  if (!Array.isArray(raw.layers) || raw.layers.length > LIMITS.manifestLayers) throw bad(`layers is not a list of at most ${LIMITS.manifestLayers}`);
  const layers = raw.layers.map((l: unknown, i: number) => checkDescriptor(l, `layers[${i}]`, bad));
  const ann = raw.annotations;
  if (!isObject(ann) || !Object.values(ann).every((v) => typeof v === "string")) throw bad("annotations is not a map of strings");
  return { schemaVersion: 2, mediaType: MEDIA.manifest, artifactType: MEDIA.artifact, config, layers, annotations: ann as Record<string, string> };
}

function checkDescriptor(raw: unknown, where: string, bad: (why: string) => CacheError): Descriptor {
  if (!isObject(raw) || typeof raw.mediaType !== "string" || raw.mediaType.length > 256 || !isValidDigest(raw.digest) || !isCount(raw.size)) throw bad(`${where} is not a descriptor { mediaType, digest, size }`);
  const a = raw.annotations;
  if (a !== undefined && !(isObject(a) && Object.values(a).every((v) => typeof v === "string"))) throw bad(`${where}.annotations is not a map of strings`);
  return { mediaType: raw.mediaType, digest: raw.digest as string, size: raw.size, ...(a ? { annotations: a as Record<string, string> } : {}) };
}

/** The layers of a manifest by role. */
export interface ManifestParts {
  rootfsIndex: Descriptor;
  imageMeta: Descriptor;
  /** Every pack the manifest lists: its size by digest. */
  packs: Map<string, number>;
}

export function manifestParts(m: ArtifactManifest, what: string): ManifestParts {
  const one = (mediaType: string): Descriptor => {
    const found = m.layers.filter((l) => l.mediaType === mediaType);
    if (found.length !== 1) throw new CacheError("CACHE_MANIFEST_INVALID", `${what}: expected one layer of type ${mediaType}, found ${found.length}`, { hint: "the cache entry is damaged: export the snapshot again" });
    return found[0]!;
  };
  const packs = new Map<string, number>();
  for (const l of m.layers) {
    if (l.mediaType !== MEDIA.pack) continue;
    if (l.size > LIMITS.packBytes) throw new CacheError("CACHE_TOO_LARGE", `${what}: pack ${l.digest} is ${l.size} bytes, more than the ${LIMITS.packBytes}-byte limit`);
    packs.set(l.digest, l.size);
  }
  return { rootfsIndex: one(MEDIA.fileIndex), imageMeta: one(MEDIA.imageMeta), packs };
}

/** Every frame an index names must lie inside a pack the manifest lists (so a registry keeps it). */
export function checkFrames(refs: Iterable<FrameRef>, packs: Map<string, number>, what: string): void {
  for (const r of refs) {
    const size = packs.get(r.pack);
    if (size === undefined) throw new CacheError("CACHE_INDEX_INVALID", `${what}: pack ${r.pack} is not a layer of the manifest`, { hint: "the cache entry is damaged: export the snapshot again" });
    if (r.at + r.size > size) throw new CacheError("CACHE_INDEX_INVALID", `${what}: a frame at ${r.at} (${r.size} bytes) lies beyond the end of pack ${r.pack} (${size} bytes)`, { hint: "the cache entry is damaged: export the snapshot again" });
  }
}

// ---- helpers -----------------------------------------------------------------------------------

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function isCount(v: unknown): v is number {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
}

function parseJsonBytes(bytes: Buffer, what: string, code: CacheErrorCode): unknown {
  try {
    return JSON.parse(bytes.toString("utf8"));
  } catch (cause) {
    throw new CacheError(code, `${what} is not valid JSON`, { cause, hint: "the cache entry is damaged: export the snapshot again" });
  }
}
