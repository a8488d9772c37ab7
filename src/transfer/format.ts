/**
 * The snapshot artifact format (docs/cache-format.md): a snapshot becomes an OCI image manifest
 * whose config blob is the snapshot's metadata and whose layers are the device state, two chunk
 * indexes (guest RAM, root filesystem), the image's metadata and the content-addressed chunks.
 * Everything read back is untrusted: every parser here bounds what it reads and validates shape.
 */
import { createRequire } from "node:module";
import { z } from "zod";
import { Compressor } from "zstd-napi";
import { isValidDigest } from "../oci/oci-layout.js";
import { CHUNK_SIZE, fileChunks as storeFileChunks, sha256hex, type RawChunk } from "../store/chunks.js";
import { META_VERSION, type SnapshotMeta } from "../store/snapshots.js";
import { CacheError, type CacheErrorCode } from "./errors.js";

/** RAM and root filesystem are cut into chunks of this size (the store's: snapshots keep RAM checksums per chunk). */
export { CHUNK_SIZE };
/** One fixed level: equal chunks compress to equal blobs, so they are stored once. */
export const ZSTD_LEVEL = 3;
export const FORMAT_VERSION = 1;

export const MEDIA = {
  manifest: "application/vnd.oci.image.manifest.v1+json",
  index: "application/vnd.oci.image.index.v1+json",
  artifact: "application/vnd.supermachine.snapshot.v1",
  config: "application/vnd.supermachine.snapshot.config.v1+json",
  state: "application/vnd.supermachine.snapshot.state.v1+zstd",
  chunkIndex: "application/vnd.supermachine.chunk-index.v1+json+zstd",
  imageMeta: "application/vnd.supermachine.image.v1+json",
  chunk: "application/vnd.supermachine.chunk.v1+zstd",
} as const;

export const ANNOTATIONS = {
  key: "dev.supermachine.key",
  name: "dev.supermachine.name",
  parent: "dev.supermachine.parent",
  engine: "dev.supermachine.engine",
  image: "dev.supermachine.image.digest",
  file: "dev.supermachine.file",
  size: "dev.supermachine.size",
  refName: "org.opencontainers.image.ref.name",
  created: "org.opencontainers.image.created",
} as const;

/** Upper bounds for what is read from a cache before it is parsed. */
export const LIMITS = {
  manifestBytes: 32 * 1024 * 1024,
  configBytes: 4 * 1024 * 1024,
  layoutIndexBytes: 64 * 1024 * 1024,
  imageMetaBytes: 4 * 1024 * 1024,
  chunkIndexBytes: 256 * 1024 * 1024,
  stateBytes: 1024 * 1024 * 1024,
  /** Guest RAM (a sparse file: only its chunks take space). */
  ramBytes: 2 ** 40,
} as const;

/** The tag (registry) and ref name (directory) of a snapshot. */
export const tagOf = (key: string): string => `sm-${key}`;
/** The tag that points at an artifact carrying the root filesystem of an image (by manifest digest). */
export const imageTagOf = (digest: string): string => `sm-image-${digest.slice("sha256:".length)}`;

export const KEY_RE = /^[0-9a-f]{64}$/;

export { sha256hex };
export const digestOf = (b: Uint8Array): string => `sha256:${sha256hex(b)}`;

// ---- zstd ------------------------------------------------------------------------------------

const binding = createRequire(import.meta.url)("zstd-napi/binding.js") as typeof import("zstd-napi/binding.js");
let compressor: Compressor | undefined;

export function compress(data: Uint8Array): Buffer {
  if (!compressor) {
    compressor = new Compressor();
    compressor.setParameters({ compressionLevel: ZSTD_LEVEL });
  }
  return compressor.compress(data);
}

/**
 * Decompresses `blob`, which must hold exactly `expected` bytes (or at most `max` when the size is
 * not known in advance: then the frame must declare it). Never allocates more than that.
 */
export function decompressBounded(blob: Uint8Array, what: string, size: { expected: number } | { max: number }): Buffer {
  let n: number;
  if ("expected" in size) n = size.expected;
  else {
    const declared = frameContentSize(blob);
    if (declared === null) throw new CacheError("CACHE_CHUNK_CORRUPT", `${what}: not a zstd frame that declares its size`);
    if (declared > size.max) throw new CacheError("CACHE_TOO_LARGE", `${what}: decompresses to ${declared} bytes, more than the ${size.max}-byte limit`);
    n = declared;
  }
  const out = Buffer.allocUnsafe(n);
  let got: number;
  try {
    got = new binding.DCtx().decompress(out, blob);
  } catch (cause) {
    throw new CacheError("CACHE_CHUNK_CORRUPT", `${what}: cannot be decompressed: ${(cause as Error).message}`, { cause });
  }
  if (got !== n) throw new CacheError("CACHE_CHUNK_CORRUPT", `${what}: decompresses to ${got} bytes, expected ${n}`);
  return out;
}

function frameContentSize(blob: Uint8Array): number | null {
  try {
    const v = binding.getFrameContentSize(blob);
    return v === null || !Number.isSafeInteger(v) ? null : v;
  } catch {
    return null;
  }
}

// ---- chunking --------------------------------------------------------------------------------

export type { RawChunk } from "../store/chunks.js";

/** The non-zero chunks of a file, in order (all-zero chunks are holes: not stored). */
export function fileChunks(path: string, size: number): AsyncGenerator<RawChunk> {
  return storeFileChunks(path, size, { copy: true, short: (got) => new CacheError("CACHE_SNAPSHOT_INVALID", `${path} ended at ${got} bytes, expected ${size}`) });
}

// ---- chunk index -----------------------------------------------------------------------------

export interface ChunkEntry {
  offset: number;
  /** Digest of the compressed blob. */
  blob: string;
  /** Compressed size. */
  size: number;
  /** sha256 (hex) of the uncompressed bytes. */
  sha256: string;
}

export interface ChunkIndex {
  version: number;
  file: "ram" | "rootfs.sqfs";
  size: number;
  chunkSize: number;
  compression: "zstd";
  chunks: ChunkEntry[];
}

/** The uncompressed length of the chunk at `offset`: the last one may be short. */
export const chunkLength = (index: ChunkIndex, offset: number): number => Math.min(index.chunkSize, index.size - offset);
/** The most a chunk's compressed blob may take (zstd's worst case, with room to spare). */
export const maxBlobSize = (chunkSize: number): number => chunkSize + (chunkSize >> 7) + 1024;

const hex64 = z.string().regex(KEY_RE);
const digestSchema = z.string().refine(isValidDigest, "not a sha256 digest");
const nonNeg = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);

const chunkIndexSchema = z
  .object({
    version: z.literal(FORMAT_VERSION),
    file: z.enum(["ram", "rootfs.sqfs"]),
    size: nonNeg,
    chunkSize: z.number().int().min(4096).max(4 * 1024 * 1024).refine((n) => n % 4096 === 0),
    compression: z.literal("zstd"),
    chunks: z.array(z.object({ offset: nonNeg, blob: digestSchema, size: z.number().int().positive(), sha256: hex64 })),
  })
  .superRefine((ix, ctx) => {
    let last = -1;
    for (const [i, c] of ix.chunks.entries()) {
      if (c.offset % ix.chunkSize !== 0 || c.offset >= ix.size || c.offset <= last) {
        ctx.addIssue({ code: "custom", path: ["chunks", i, "offset"], message: `offset ${c.offset} is not a chunk boundary in order inside the file` });
        return;
      }
      if (c.size > maxBlobSize(ix.chunkSize)) {
        ctx.addIssue({ code: "custom", path: ["chunks", i, "size"], message: `compressed size ${c.size} is more than a chunk can take` });
        return;
      }
      last = c.offset;
    }
  });

export function encodeChunkIndex(index: ChunkIndex): Buffer {
  return compress(Buffer.from(JSON.stringify(index)));
}

export function decodeChunkIndex(blob: Buffer, what: string): ChunkIndex {
  const raw = decompressBounded(blob, what, { max: LIMITS.chunkIndexBytes });
  return parseJson(raw, chunkIndexSchema, what, "CACHE_INDEX_INVALID") as ChunkIndex;
}

// ---- the snapshot's metadata (config blob) ---------------------------------------------------

/** meta.json as it travels: without the machine-local path of the root filesystem. */
export type SnapshotConfig = Omit<SnapshotMeta, "image"> & { image: Omit<SnapshotMeta["image"], "rootfs"> };

export function toConfig(meta: SnapshotMeta): SnapshotConfig {
  const { rootfs: _local, ...image } = meta.image;
  return { ...meta, image };
}

const engineSchema = z.object({ qemu: z.string(), accel: z.enum(["kvm", "tcg"]), kernelKey: z.string(), agentKey: z.string(), agentVersion: z.string() }).passthrough();

const configSchema = z
  .object({
    version: z.literal(META_VERSION),
    hash: hex64,
    inputs: z.object({ parent: hex64.nullable(), manifestDigest: digestSchema.nullable(), memoryMib: nonNeg, vcpus: nonNeg, engine: engineSchema }).passthrough(),
    sources: z.object({ name: z.string().max(256) }).passthrough().optional(),
    image: z.object({ ref: z.string(), digest: digestSchema, config: z.object({}).passthrough(), rootfsSize: nonNeg }).passthrough(),
    memoryMib: nonNeg,
    vcpus: nonNeg,
    files: z.object({ ram: z.object({ size: nonNeg.max(LIMITS.ramBytes) }), state: z.object({ size: nonNeg.max(LIMITS.stateBytes), sha256: hex64 }) }),
    workload: z.unknown(),
    workloadRunning: z.boolean(),
    created: z.string(),
    bakeMs: z.number(),
  })
  .passthrough();

export function parseConfig(bytes: Buffer, what: string): SnapshotConfig {
  const c = parseJson(bytes, configSchema, what, "CACHE_CONFIG_INVALID") as unknown as SnapshotConfig & { image: { rootfs?: unknown } };
  if ("rootfs" in c.image) delete c.image.rootfs; // never trust a path from elsewhere
  return c;
}

// ---- the manifest ----------------------------------------------------------------------------

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

const descriptorSchema = z.object({
  mediaType: z.string().max(256),
  digest: digestSchema,
  size: nonNeg,
  annotations: z.record(z.string(), z.string()).optional(),
});

const manifestSchema = z
  .object({
    schemaVersion: z.literal(2),
    mediaType: z.literal(MEDIA.manifest),
    artifactType: z.literal(MEDIA.artifact),
    config: descriptorSchema,
    layers: z.array(descriptorSchema),
    annotations: z.record(z.string(), z.string()),
  })
  .passthrough();

export function parseManifest(bytes: Buffer, what: string): ArtifactManifest {
  const m = parseJson(bytes, manifestSchema, what, "CACHE_MANIFEST_INVALID") as ArtifactManifest;
  if (m.config.mediaType !== MEDIA.config) {
    throw new CacheError("CACHE_MANIFEST_INVALID", `${what}: its config has media type ${JSON.stringify(m.config.mediaType)}, expected ${MEDIA.config}`);
  }
  return m;
}

/** The special layers of a manifest, by role. */
export interface ManifestParts {
  state: Descriptor;
  ramIndex: Descriptor;
  rootfsIndex: Descriptor;
  imageMeta: Descriptor;
  /** Compressed size of every chunk blob the manifest lists, by digest. */
  chunks: Map<string, number>;
}

export function manifestParts(m: ArtifactManifest, what: string): ManifestParts {
  const one = (mediaType: string, file?: string): Descriptor => {
    const found = m.layers.filter((l) => l.mediaType === mediaType && (file === undefined || l.annotations?.[ANNOTATIONS.file] === file));
    if (found.length !== 1) throw new CacheError("CACHE_MANIFEST_INVALID", `${what}: expected one layer of type ${mediaType}${file ? ` for ${file}` : ""}, found ${found.length}`);
    return found[0]!;
  };
  const chunks = new Map<string, number>();
  for (const l of m.layers) if (l.mediaType === MEDIA.chunk) chunks.set(l.digest, l.size);
  return { state: one(MEDIA.state), ramIndex: one(MEDIA.chunkIndex, "ram"), rootfsIndex: one(MEDIA.chunkIndex, "rootfs.sqfs"), imageMeta: one(MEDIA.imageMeta), chunks };
}

/** The manifest's bytes: a fixed key order, so the same snapshot always makes the same digest. */
export function encodeManifest(m: ArtifactManifest): Buffer {
  return Buffer.from(JSON.stringify(m));
}

function parseJson<S extends z.ZodType>(bytes: Buffer, schema: S, what: string, code: CacheErrorCode): z.output<S> {
  let raw: unknown;
  try {
    raw = JSON.parse(bytes.toString("utf8"));
  } catch (cause) {
    throw new CacheError(code, `${what} is not valid JSON`, { cause, hint: "the cache entry is damaged: export the snapshot again" });
  }
  const r = schema.safeParse(raw);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    throw new CacheError(code, `${what} is not valid: ${issue.path.join(".") || "(root)"}: ${issue.message}`, { hint: "the cache entry is damaged or was written by another version: export the snapshot again" });
  }
  return r.data;
}
