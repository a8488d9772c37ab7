import { createHash } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { ImageError } from "../errors.js";

/** Metadata and content limits. */
export const MAX_JSON_BYTES = 4 * 1024 * 1024;
const MAX_INDEX_DEPTH = 4;
const DIGEST_RE = /^sha256:[a-f0-9]{64}$/;
const REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name";

export const MEDIA_TYPES = {
  ociIndex: "application/vnd.oci.image.index.v1+json",
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  ociConfig: "application/vnd.oci.image.config.v1+json",
  dockerList: "application/vnd.docker.distribution.manifest.list.v2+json",
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
  dockerConfig: "application/vnd.docker.container.image.v1+json",
} as const;

const INDEX_TYPES = new Set<string>([MEDIA_TYPES.ociIndex, MEDIA_TYPES.dockerList]);
const MANIFEST_TYPES = new Set<string>([MEDIA_TYPES.ociManifest, MEDIA_TYPES.dockerManifest]);
const CONFIG_TYPES = new Set<string>([MEDIA_TYPES.ociConfig, MEDIA_TYPES.dockerConfig]);

/** Layer media types we can apply; compression is confirmed from magic bytes in flatten. */
const LAYER_TYPES = new Set<string>([
  "application/vnd.oci.image.layer.v1.tar",
  "application/vnd.oci.image.layer.v1.tar+gzip",
  "application/vnd.oci.image.layer.v1.tar+zstd",
  "application/vnd.oci.image.layer.nondistributable.v1.tar",
  "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
  "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
  "application/vnd.docker.image.rootfs.diff.tar",
  "application/vnd.docker.image.rootfs.diff.tar.gzip",
  "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
  "application/vnd.oci.image.layer.v1.tar.gzip",
]);

/** Platform we run: the host's architecture (microVMs use KVM, no emulation). */
export const TARGET_PLATFORM = { os: "linux", architecture: process.arch === "arm64" ? "arm64" : "amd64" } as const;

/** The parts of an image config that matter for running a container. */
import type { ImageConfig } from "../schema/image.js";
export type { ImageConfig };

export interface LayerDescriptor {
  digest: string;
  mediaType: string;
  size: number;
}

/** A layer plus the (validated) path of its blob. */
export interface LayerBlob extends LayerDescriptor {
  path: string;
}

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
  platform?: { os?: string; architecture?: string; variant?: string };
}

/** The manifest picked from a layout, verified against its digest. */
export interface SelectedManifest {
  layoutDir: string;
  /** Digest of the image manifest (never of an index). */
  digest: string;
  mediaType: string;
  configDescriptor: Descriptor;
  layers: LayerBlob[];
}

export interface LoadedImage extends SelectedManifest {
  config: ImageConfig;
  architecture?: string;
  os?: string;
}

/** True when `digest` is a sha256 digest in canonical form. */
export function isValidDigest(digest: unknown): digest is string {
  return typeof digest === "string" && DIGEST_RE.test(digest);
}

/** Path of a blob; refuses anything that is not a canonical sha256 digest. */
export function blobPath(layoutDir: string, digest: string, ref: string): string {
  if (!isValidDigest(digest)) {
    throw new ImageError("IMAGE_DIGEST_INVALID", `image ${JSON.stringify(ref)} refers to blob digest ${JSON.stringify(digest)}, which is not of the form sha256:<64 hex>`, {
      hint: "only sha256 digests are supported; the layout may be corrupt or made by an unsupported tool",
    });
  }
  return join(layoutDir, "blobs", "sha256", digest.slice("sha256:".length));
}

/**
 * Picks the image manifest for `tag` (or the default one) from an OCI layout, following
 * nested indexes to the host platform, and verifies every blob read on the way.
 */
export async function selectManifest(layoutDir: string, ref: string, tag?: string): Promise<SelectedManifest> {
  await checkLayoutMarker(layoutDir, ref);
  const indexPath = join(layoutDir, "index.json");
  const index = parseJson(await readLimited(indexPath, ref, "index.json"), ref, indexPath);
  return resolveDescriptor(layoutDir, pickFromTopIndex(index, ref, indexPath, tag), ref);
}

/**
 * Selects an image by the digest of its manifest (or of an index, which is then followed to
 * the host platform), for layouts without a tag for it, such as the shared blob store.
 */
export async function selectManifestByDigest(layoutDir: string, digest: string, ref: string): Promise<SelectedManifest> {
  const path = blobPath(layoutDir, digest, ref);
  let size: number;
  try {
    size = (await stat(path)).size;
  } catch (cause) {
    throw new ImageError("IMAGE_BLOB_MISSING", `image ${JSON.stringify(ref)}: manifest ${digest} is not in ${layoutDir}`, { cause });
  }
  const raw = asObject(parseJson(await readBlob(layoutDir, { digest, size, mediaType: "" }, ref), ref, path), ref, path);
  const mediaType =
    typeof raw.mediaType === "string" ? raw.mediaType : Array.isArray(raw.manifests) ? MEDIA_TYPES.ociIndex : MEDIA_TYPES.ociManifest;
  return resolveDescriptor(layoutDir, { digest, size, mediaType }, ref);
}

/** Follows `desc` through nested indexes to the host platform's manifest, and reads that. */
async function resolveDescriptor(layoutDir: string, top: Descriptor, ref: string): Promise<SelectedManifest> {
  let desc = top;
  for (let depth = 0; INDEX_TYPES.has(desc.mediaType); depth++) {
    if (depth >= MAX_INDEX_DEPTH) {
      throw new ImageError("IMAGE_INDEX_TOO_DEEP", `image ${JSON.stringify(ref)}: image indexes nest deeper than ${MAX_INDEX_DEPTH} levels`);
    }
    const path = blobPath(layoutDir, desc.digest, ref);
    const nested = parseJson(await readBlob(layoutDir, desc, ref), ref, path);
    desc = pickPlatform(nested, ref, desc.digest);
  }
  if (!MANIFEST_TYPES.has(desc.mediaType)) {
    throw new ImageError("IMAGE_MEDIA_TYPE_UNSUPPORTED", `image ${JSON.stringify(ref)}: descriptor ${desc.digest} has media type ${JSON.stringify(desc.mediaType)}, not an image manifest`, {
      hint: `supported manifest types: ${[...MANIFEST_TYPES].join(", ")}`,
    });
  }
  const manifestPath = blobPath(layoutDir, desc.digest, ref);
  const manifest = asObject(parseJson(await readBlob(layoutDir, desc, ref), ref, manifestPath), ref, manifestPath);
  if (typeof manifest.mediaType === "string" && !MANIFEST_TYPES.has(manifest.mediaType)) {
    throw new ImageError("IMAGE_MEDIA_TYPE_UNSUPPORTED", `image ${JSON.stringify(ref)}: manifest ${desc.digest} declares media type ${JSON.stringify(manifest.mediaType)}`);
  }
  const configDescriptor = toDescriptor(manifest.config, ref, `config of manifest ${desc.digest}`);
  if (!CONFIG_TYPES.has(configDescriptor.mediaType)) {
    throw new ImageError("IMAGE_MEDIA_TYPE_UNSUPPORTED", `image ${JSON.stringify(ref)}: config ${configDescriptor.digest} has media type ${JSON.stringify(configDescriptor.mediaType)}, not a container image config`, {
      hint: "this looks like an OCI artifact rather than a runnable image",
    });
  }
  if (!Array.isArray(manifest.layers)) {
    throw new ImageError("IMAGE_MANIFEST_INVALID", `image ${JSON.stringify(ref)}: manifest ${desc.digest} (${manifestPath}) has no "layers" array`);
  }
  const layers = manifest.layers.map((raw, i): LayerBlob => {
    const d = toDescriptor(raw, ref, `layer ${i} of manifest ${desc.digest}`);
    if (!LAYER_TYPES.has(d.mediaType)) {
      throw new ImageError("IMAGE_LAYER_MEDIA_TYPE_UNSUPPORTED", `image ${JSON.stringify(ref)}: layer ${d.digest} has unsupported media type ${JSON.stringify(d.mediaType)}`, {
        hint: "layers must be tar archives: uncompressed, gzip- or zstd-compressed",
      });
    }
    return { digest: d.digest, mediaType: d.mediaType, size: d.size, path: blobPath(layoutDir, d.digest, ref) };
  });
  return { layoutDir, digest: desc.digest, mediaType: desc.mediaType, configDescriptor, layers };
}

/** Reads and verifies the config blob of a selected manifest. */
export async function loadImage(selected: SelectedManifest, ref: string): Promise<LoadedImage> {
  const desc = selected.configDescriptor;
  const path = blobPath(selected.layoutDir, desc.digest, ref);
  const raw = asObject(parseJson(await readBlob(selected.layoutDir, desc, ref), ref, path), ref, path);
  const arch = typeof raw.architecture === "string" ? raw.architecture : undefined;
  const os = typeof raw.os === "string" ? raw.os : undefined;
  if ((arch !== undefined && arch !== TARGET_PLATFORM.architecture) || (os !== undefined && os !== TARGET_PLATFORM.os)) {
    throw new ImageError("IMAGE_PLATFORM_UNSUPPORTED", `image ${JSON.stringify(ref)} is built for ${os ?? "?"}/${arch ?? "?"}, this host runs ${TARGET_PLATFORM.os}/${TARGET_PLATFORM.architecture}`, {
      hint: `export the ${TARGET_PLATFORM.os}/${TARGET_PLATFORM.architecture} variant of the image`,
    });
  }
  const loaded: LoadedImage = { ...selected, config: parseImageConfig(raw.config, ref, path) };
  if (arch !== undefined) loaded.architecture = arch;
  if (os !== undefined) loaded.os = os;
  return loaded;
}

/** Converts the `config` object of an image config (Docker-style capitalised keys). */
export function parseImageConfig(raw: unknown, ref: string, path: string): ImageConfig {
  const out: ImageConfig = { env: [], exposedPorts: [], labels: {} };
  if (raw === undefined || raw === null) return out;
  const c = asObject(raw, ref, path);
  const bad = (field: string, expected: string): never => {
    throw new ImageError("IMAGE_CONFIG_INVALID", `image ${JSON.stringify(ref)}: config field ${field} in ${path} must be ${expected}`);
  };
  const strings = (field: string): string[] | undefined => {
    const v = c[field];
    if (v === undefined || v === null) return undefined;
    if (!Array.isArray(v) || !v.every((s) => typeof s === "string")) return bad(field, "an array of strings");
    return v as string[];
  };
  const str = (field: string): string | undefined => {
    const v = c[field];
    if (v === undefined || v === null || v === "") return undefined;
    return typeof v === "string" ? v : bad(field, "a string");
  };
  out.env = strings("Env") ?? [];
  const entrypoint = strings("Entrypoint");
  if (entrypoint) out.entrypoint = entrypoint;
  const cmd = strings("Cmd");
  if (cmd) out.cmd = cmd;
  const workingDir = str("WorkingDir");
  if (workingDir !== undefined) out.workingDir = workingDir;
  const user = str("User");
  if (user !== undefined) out.user = user;
  if (c.ExposedPorts !== undefined && c.ExposedPorts !== null) {
    out.exposedPorts = Object.keys(asObject(c.ExposedPorts, ref, path)).sort();
  }
  if (c.Labels !== undefined && c.Labels !== null) {
    for (const [k, v] of Object.entries(asObject(c.Labels, ref, path))) {
      if (typeof v !== "string") bad(`Labels.${k}`, "a string");
      out.labels[k] = v as string;
    }
  }
  return out;
}

/** Reads a blob, checking size limit, descriptor size and sha256. */
export async function readBlob(layoutDir: string, desc: Descriptor, ref: string): Promise<Buffer> {
  const path = blobPath(layoutDir, desc.digest, ref);
  if (desc.size > MAX_JSON_BYTES) {
    throw new ImageError("IMAGE_BLOB_TOO_LARGE", `image ${JSON.stringify(ref)}: blob ${desc.digest} is ${desc.size} bytes, more than the ${MAX_JSON_BYTES}-byte limit for metadata`);
  }
  const data = await readLimited(path, ref, `blob ${desc.digest}`);
  if (data.length !== desc.size) {
    throw new ImageError("IMAGE_BLOB_SIZE_MISMATCH", `image ${JSON.stringify(ref)}: blob ${desc.digest} (${path}) is ${data.length} bytes, its descriptor says ${desc.size}`, {
      hint: "the layout is corrupt or incomplete; export the image again",
    });
  }
  const actual = `sha256:${createHash("sha256").update(data).digest("hex")}`;
  if (actual !== desc.digest) throw digestMismatch(ref, desc.digest, actual, path);
  return data;
}

export function digestMismatch(ref: string, expected: string, actual: string, path: string): ImageError {
  return new ImageError("IMAGE_DIGEST_MISMATCH", `image ${JSON.stringify(ref)}: blob ${expected} (${path}) has digest ${actual}`, {
    hint: "the blob is corrupt or was modified; export the image again",
  });
}

async function checkLayoutMarker(layoutDir: string, ref: string): Promise<void> {
  const path = join(layoutDir, "oci-layout");
  let marker: unknown;
  try {
    marker = JSON.parse(await readFile(path, "utf8"));
  } catch (cause) {
    throw new ImageError("IMAGE_LAYOUT_INVALID", `image ${JSON.stringify(ref)}: ${layoutDir} is not an OCI image layout (cannot read ${path})`, {
      cause,
      hint: "an OCI layout directory holds oci-layout, index.json and blobs/",
    });
  }
  const version = (marker as { imageLayoutVersion?: unknown } | null)?.imageLayoutVersion;
  if (typeof version !== "string" || !version.startsWith("1.")) {
    throw new ImageError("IMAGE_LAYOUT_INVALID", `image ${JSON.stringify(ref)}: ${path} has imageLayoutVersion ${JSON.stringify(version)}, expected 1.x`);
  }
}

async function readLimited(path: string, ref: string, what: string): Promise<Buffer> {
  let size: number;
  try {
    size = (await stat(path)).size;
  } catch (cause) {
    throw new ImageError("IMAGE_BLOB_MISSING", `image ${JSON.stringify(ref)}: ${what} is missing (${path})`, {
      cause,
      hint: "the layout is incomplete; export the image again",
    });
  }
  if (size > MAX_JSON_BYTES) {
    throw new ImageError("IMAGE_BLOB_TOO_LARGE", `image ${JSON.stringify(ref)}: ${what} (${path}) is ${size} bytes, more than the ${MAX_JSON_BYTES}-byte limit`);
  }
  return readFile(path);
}

function parseJson(data: Buffer, ref: string, path: string): unknown {
  try {
    return JSON.parse(data.toString("utf8"));
  } catch (cause) {
    throw new ImageError("IMAGE_JSON_INVALID", `image ${JSON.stringify(ref)}: ${path} is not valid JSON`, { cause });
  }
}

function asObject(v: unknown, ref: string, path: string): Record<string, unknown> {
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new ImageError("IMAGE_JSON_INVALID", `image ${JSON.stringify(ref)}: expected a JSON object in ${path}`);
  }
  return v as Record<string, unknown>;
}

function toDescriptor(raw: unknown, ref: string, what: string): Descriptor {
  const d = raw as Partial<Descriptor> | null;
  if (typeof d !== "object" || d === null || typeof d.mediaType !== "string" || typeof d.size !== "number" || !Number.isSafeInteger(d.size) || d.size < 0) {
    throw new ImageError("IMAGE_DESCRIPTOR_INVALID", `image ${JSON.stringify(ref)}: ${what} is not a valid descriptor (needs mediaType, digest, size)`);
  }
  if (!isValidDigest(d.digest)) {
    throw new ImageError("IMAGE_DIGEST_INVALID", `image ${JSON.stringify(ref)}: ${what} has digest ${JSON.stringify(d.digest)}, which is not of the form sha256:<64 hex>`, {
      hint: "only sha256 digests are supported",
    });
  }
  const out: Descriptor = { mediaType: d.mediaType, digest: d.digest, size: d.size };
  if (d.annotations && typeof d.annotations === "object") out.annotations = d.annotations;
  if (d.platform && typeof d.platform === "object") out.platform = d.platform;
  return out;
}

function descriptorsOf(index: unknown, ref: string, where: string): Descriptor[] {
  const list = (index as { manifests?: unknown } | null)?.manifests;
  if (!Array.isArray(list)) {
    throw new ImageError("IMAGE_INDEX_INVALID", `image ${JSON.stringify(ref)}: ${where} has no "manifests" array`);
  }
  return list.map((m, i) => toDescriptor(m, ref, `manifests[${i}] of ${where}`));
}

/** Top-level choice: by tag, else the only manifest, else the one tagged latest. */
function pickFromTopIndex(index: unknown, ref: string, indexPath: string, tag?: string): Descriptor {
  const all = descriptorsOf(index, ref, indexPath);
  const tagOf = (d: Descriptor) => d.annotations?.[REF_NAME_ANNOTATION];
  const tags = [...new Set(all.map(tagOf).filter((t): t is string => typeof t === "string"))].sort();
  const available = tags.length ? tags.join(", ") : "(none)";
  if (all.length === 0) {
    throw new ImageError("IMAGE_INDEX_EMPTY", `image ${JSON.stringify(ref)}: ${indexPath} lists no manifests`);
  }
  let candidates: Descriptor[];
  if (tag !== undefined) {
    candidates = all.filter((d) => tagOf(d) === tag);
    if (candidates.length === 0) {
      throw new ImageError("IMAGE_TAG_NOT_FOUND", `image ${JSON.stringify(ref)}: tag ${JSON.stringify(tag)} not found in ${indexPath}; available tags: ${available}`, {
        hint: tags[0] !== undefined ? `use one of the available tags, e.g. oci:<dir>:${tags[0]}` : "the layout has no tagged manifests; omit the tag",
      });
    }
  } else if (all.length === 1) {
    candidates = all;
  } else {
    candidates = all.filter((d) => tagOf(d) === "latest");
    if (candidates.length === 0) {
      throw new ImageError("IMAGE_TAG_REQUIRED", `image ${JSON.stringify(ref)}: ${indexPath} holds ${all.length} manifests and none is tagged "latest"; available tags: ${available}`, {
        hint: "add a tag to the reference: oci:<dir>:<tag>",
      });
    }
  }
  return candidates.length === 1 ? candidates[0]! : pickPlatform({ manifests: candidates }, ref, indexPath);
}

/** Picks the host-platform entry of an index (entries without a platform count as a match only if alone). */
function pickPlatform(index: unknown, ref: string, where: string): Descriptor {
  const all = descriptorsOf(index, ref, where);
  const match = all.find(
    (d) => d.platform?.os === TARGET_PLATFORM.os && d.platform?.architecture === TARGET_PLATFORM.architecture,
  );
  if (match) return match;
  if (all.length === 1 && all[0]!.platform === undefined) return all[0]!;
  const platforms = all.map((d) => (d.platform ? `${d.platform.os ?? "?"}/${d.platform.architecture ?? "?"}` : "(unspecified)"));
  throw new ImageError("IMAGE_PLATFORM_UNSUPPORTED", `image ${JSON.stringify(ref)}: index ${where} has no ${TARGET_PLATFORM.os}/${TARGET_PLATFORM.architecture} manifest (has: ${platforms.join(", ")})`, {
    hint: `export the ${TARGET_PLATFORM.os}/${TARGET_PLATFORM.architecture} variant of the image`,
  });
}
