/**
 * Local tags (`docker tag` / `docker load`): makes an image available under a registry-style
 * name without any network. The source's manifest, config and layers are copied into the shared
 * blob store (each verified by digest on the way in) and a ref record names the manifest, so
 * `resolveImage(target)` finds it with pullPolicy "missing" or "never", `listImages` lists it
 * and `removeImage` forgets it, as for a pulled image.
 */
import { createReadStream } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { ImageError, RefError } from "../errors.js";
import { BlobStore } from "../store/blobs.js";
import type { RegistryRef } from "../oci/docker-ref.js";
import { blobPath, MAX_JSON_BYTES, readBlob, selectManifest, selectManifestByDigest, type Descriptor, type SelectedManifest } from "../oci/oci-layout.js";
import { platformString, pullImage, selectPlatform } from "../registry/index.js";
import type { Platform } from "../registry/options.js";
import type { ImageProgress } from "../schema/image.js";
import { importDockerArchive } from "./docker-archive.js";
import { locateLayout, parseImageRef, type ImageRef } from "./reference.js";
import { readRef, writeRef } from "./local-names.js";

export type TagProgress =
  /** The source is being pulled from its registry (it was not present locally). */
  | Extract<ImageProgress, { phase: "pull" | "import" }>
  /** A blob of the image is in the store: copied now, or already there (`cached`). */
  | { phase: "copy"; kind: "layer" | "config" | "manifest"; digest: string; index: number; count: number; bytes: number; cached: boolean };

export interface TagOptions {
  /** supermachine home; defaults to `$SUPERMACHINE_HOME` or the user cache dir (paths.ts). */
  home?: string;
  onProgress?: (p: TagProgress) => void;
  /** Platform to pick from a multi-platform source (default: linux and the host's architecture). */
  platform?: Platform;
  /** Registries (host[:port]) to reach over plain HTTP, when the source must be pulled. */
  insecureRegistries?: string[];
  signal?: AbortSignal;
}

export interface TagResult {
  /** The canonical form of the target (`docker.io/library/python:3-bookworm`). */
  target: string;
  /** The image manifest the target now names. */
  manifestDigest: string;
}

const MAX_INDEX_DEPTH = 4;
const REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name";

/**
 * Names the image `source` (any reference form: `oci:`, `builtin:`, `docker-archive:`, or a
 * registry reference, used from the local store when present and pulled otherwise) as `target`,
 * a registry-style name without a digest. An existing tag of that name is replaced.
 */
export async function tagImage(source: string, target: string, opts: TagOptions = {}): Promise<TagResult> {
  const name = parseTagTarget(target); // before any work: a bad target costs nothing
  const store = BlobStore.open(opts.home);
  const selected = await selectSource(parseImageRef(source), store, opts);
  if (opts.platform && !(await hasPlatform(selected, source, opts.platform))) {
    throw new ImageError("IMAGE_PLATFORM_MISMATCH", `image ${JSON.stringify(source)} is not built for ${platformString(opts.platform)}`, {
      hint: "drop the platform option, or tag an image (or an index) that has that platform",
    });
  }
  await copyIntoStore(selected, store, source, opts);
  // The record last: a ref names a manifest only once everything it needs is stored.
  await writeRef({ ref: name.canonical, manifestDigest: selected.digest, source: "tag", pulledAt: new Date().toISOString() }, opts.home);
  return { target: name.canonical, manifestDigest: selected.digest };
}

/** Parses the target of a tag: a registry-style name (`name[:tag]`, `host[:port]/path[:tag]`), no digest. */
export function parseTagTarget(target: string): RegistryRef {
  const parsed = parseImageRef(target); // a malformed name fails here, naming the part at fault
  if (parsed.kind !== "registry") {
    throw new RefError("REF_TAG_TARGET_INVALID", `cannot tag an image as ${JSON.stringify(target)}: a tag is a registry-style name ([registry/]name[:tag]), and "${parsed.kind}:" references name image files`, {
      hint: 'use a name such as "python:3-bookworm" or "localhost/my-image:v1"',
    });
  }
  const r = parsed.registry;
  if (r.digest !== undefined) {
    const withoutDigest = target.slice(0, target.lastIndexOf("@"));
    throw new RefError("REF_TAG_TARGET_DIGEST", `cannot tag an image as ${JSON.stringify(target)}: a tag cannot carry a digest (the digest is the image's own)`, {
      hint: `drop the digest: ${withoutDigest}${r.tag === undefined ? ":latest" : ""}`,
    });
  }
  return r;
}

/** The source's image manifest, in its layout (an OCI layout on disk or the blob store). */
async function selectSource(src: ImageRef, store: BlobStore, opts: TagOptions): Promise<SelectedManifest> {
  const ref = src.ref;
  switch (src.kind) {
    case "oci":
    case "builtin": {
      const loc = locateLayout(src, opts.home);
      return opts.platform ? selectLayoutPlatform(loc.layoutDir, ref, loc.tag, opts.platform) : selectManifest(loc.layoutDir, ref, loc.tag);
    }
    case "docker-archive": {
      // Imported straight into the store (a docker archive holds one platform's image).
      opts.onProgress?.({ phase: "import", file: src.file });
      const imported = await importDockerArchive(src.file, { store, ref, ...(src.name !== undefined ? { name: src.name } : {}) });
      return selectManifestByDigest(store.root, imported.manifestDigest, ref);
    }
    case "registry":
      return selectRegistry(src.registry, ref, store, opts);
  }
}

/** A registry reference: the local record when there is one (pullPolicy "missing"), else a pull. */
async function selectRegistry(r: RegistryRef, ref: string, store: BlobStore, opts: TagOptions): Promise<SelectedManifest> {
  const record = await readRef(r.canonical, opts.home);
  if (record && (await store.has(record.manifestDigest))) {
    const local = await selectManifestByDigest(store.root, record.manifestDigest, ref);
    // A record names the platform that was pulled; another one asked for means a pull.
    if (!opts.platform || (await hasPlatform(local, ref, opts.platform))) return local;
  }
  if (r.digest && (await store.has(r.digest))) {
    const size = (await stat(store.path(r.digest))).size;
    return followToPlatform(store.root, { mediaType: "", digest: r.digest, size }, ref, opts.platform);
  }
  // Pulled blobs land in the store; the source's own name is not recorded (only the tag is).
  const pulled = await pullImage(r, {
    store,
    ...(opts.platform ? { platform: opts.platform } : {}),
    ...(opts.insecureRegistries ? { insecureRegistries: opts.insecureRegistries } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
    onProgress: (event) => opts.onProgress?.({ phase: "pull", event }),
  });
  return selectManifestByDigest(store.root, pulled.manifestDigest, ref);
}

/**
 * A layout's manifest for `want`. selectManifest (oci-layout.ts) picks the host's platform; this
 * picks the top-level entry the same way (by tag, the only one, or the one tagged latest) and
 * then follows indexes to `want`.
 */
async function selectLayoutPlatform(layoutDir: string, ref: string, tag: string | undefined, want: Platform): Promise<SelectedManifest> {
  const indexPath = join(layoutDir, "index.json");
  const index = await readJson(indexPath, ref);
  const all = Array.isArray(index.manifests) ? (index.manifests as { annotations?: Record<string, unknown> }[]) : [];
  const tagOf = (d: { annotations?: Record<string, unknown> } | null) => d?.annotations?.[REF_NAME_ANNOTATION];
  const candidates = tag !== undefined ? all.filter((d) => tagOf(d) === tag) : all.length === 1 ? all : all.filter((d) => tagOf(d) === "latest");
  // Nothing to choose from: the host-platform reader reports why (unknown tag, no "latest", bad index).
  if (candidates.length === 0) return selectManifest(layoutDir, ref, tag);
  const top = selectPlatform({ manifests: candidates }, want, indexPath);
  return followToPlatform(layoutDir, top, ref, want);
}

/** Follows `desc` through image indexes to the manifest for `want` (the host's when undefined). */
async function followToPlatform(layoutDir: string, desc: Descriptor, ref: string, want: Platform | undefined): Promise<SelectedManifest> {
  if (!want) return selectManifestByDigest(layoutDir, desc.digest, ref);
  for (let depth = 0; ; depth++) {
    const doc = parse(await readBlob(layoutDir, desc, ref), ref, blobPath(layoutDir, desc.digest, ref));
    if (!Array.isArray(doc.manifests)) return selectManifestByDigest(layoutDir, desc.digest, ref);
    if (depth >= MAX_INDEX_DEPTH) {
      throw new ImageError("IMAGE_INDEX_TOO_DEEP", `image ${JSON.stringify(ref)}: image indexes nest deeper than ${MAX_INDEX_DEPTH} levels`);
    }
    desc = selectPlatform(doc, want, `index ${desc.digest} of ${ref}`);
  }
}

/** True when the image's config says it is built for `want` (os and architecture). */
async function hasPlatform(selected: SelectedManifest, ref: string, want: Platform): Promise<boolean> {
  const desc = selected.configDescriptor;
  const config = parse(await readBlob(selected.layoutDir, desc, ref), ref, blobPath(selected.layoutDir, desc.digest, ref));
  return config.os === want.os && config.architecture === want.architecture;
}

/**
 * Ingests the image's layers, config and manifest into the store, from the source layout's
 * blob files; the store hashes each while writing and keeps it only if it matches its digest.
 * The manifest goes last: a stored manifest implies its blobs are stored (locateRegistry
 * relies on that when it finds one).
 */
async function copyIntoStore(selected: SelectedManifest, store: BlobStore, ref: string, opts: TagOptions): Promise<void> {
  const blobs: { kind: "layer" | "config" | "manifest"; digest: string; size: number }[] = [
    ...selected.layers.map((l) => ({ kind: "layer" as const, digest: l.digest, size: l.size })),
    { kind: "config", digest: selected.configDescriptor.digest, size: selected.configDescriptor.size },
    { kind: "manifest", digest: selected.digest, size: (await stat(blobPath(selected.layoutDir, selected.digest, ref))).size },
  ];
  const inStore = selected.layoutDir === store.root;
  for (const [index, b] of blobs.entries()) {
    const what = `${b.kind} ${b.digest} of ${ref}`;
    const cached = await store.has(b.digest, b.size);
    if (!cached) {
      const path = blobPath(selected.layoutDir, b.digest, ref);
      const present = await stat(path).then((s) => s.isFile(), () => false);
      if (inStore || !present) {
        throw new ImageError("IMAGE_BLOB_MISSING", `image ${JSON.stringify(ref)}: ${b.kind} ${b.digest} is missing from ${selected.layoutDir}`, {
          hint: inStore ? `pull the image again (supermachine pull ${ref})` : "the layout is incomplete; export the image again",
        });
      }
      await store.ingest(b.digest, async () => createReadStream(path), { size: b.size, what, ...(opts.signal ? { signal: opts.signal } : {}) });
    }
    opts.onProgress?.({ phase: "copy", kind: b.kind, digest: b.digest, index, count: blobs.length, bytes: b.size, cached });
  }
}

async function readJson(path: string, ref: string): Promise<Record<string, unknown>> {
  let data: Buffer;
  try {
    if ((await stat(path)).size > MAX_JSON_BYTES) {
      throw new ImageError("IMAGE_BLOB_TOO_LARGE", `image ${JSON.stringify(ref)}: ${path} is more than the ${MAX_JSON_BYTES}-byte limit`);
    }
    data = await readFile(path);
  } catch (cause) {
    if (cause instanceof ImageError) throw cause;
    throw new ImageError("IMAGE_LAYOUT_INVALID", `image ${JSON.stringify(ref)}: cannot read ${path}`, {
      cause,
      hint: "an OCI layout directory holds oci-layout, index.json and blobs/",
    });
  }
  return parse(data, ref, path);
}

function parse(data: Buffer, ref: string, path: string): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(data.toString("utf8"));
  } catch (cause) {
    throw new ImageError("IMAGE_JSON_INVALID", `image ${JSON.stringify(ref)}: ${path} is not valid JSON`, { cause });
  }
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new ImageError("IMAGE_JSON_INVALID", `image ${JSON.stringify(ref)}: expected a JSON object in ${path}`);
  }
  return v as Record<string, unknown>;
}
