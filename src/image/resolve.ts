/**
 * Image references to root filesystems: `resolveImage` finds the manifest a reference names (a
 * layout, the local names, a registry pull or a docker archive), flattens its layers into a
 * squashfs and publishes it as an entry of the store (src/store/images.ts: one directory per
 * manifest digest, appearing only by an atomic rename of a complete temp directory; builders of
 * one digest take turns under its lock, and a crashed builder's temp directory is removed by the
 * next). A registry tag a project's lockfile pins resolves by its digest (`pinned`), and
 * `resolveTag` asks a registry what a tag names now (`build --update`).
 */
import { rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { ImageError } from "../errors.js";
import { logger } from "../debug.js";
import { homePaths } from "../paths.js";
import { planFlatten, streamFlattened, type FlattenOptions } from "./flatten.js";
import { pullImage, resolveDigest, type PullOptions, type PullProgress } from "../registry/index.js";
import type { Platform } from "../registry/options.js";
import { BlobStore } from "../store/blobs.js";
import { importDockerArchive } from "./docker-archive.js";
import type { RegistryRef } from "../oci/docker-ref.js";
import { loadImage, selectManifest, selectManifestByDigest, type ImageConfig, type SelectedManifest } from "../oci/oci-layout.js";
import { locateLayout, parseImageRef, type ImageRef } from "./reference.js";
import { readRef, writeRef, type RefRecord } from "./local-names.js";
import { buildSquashfs } from "./squashfs.js";
import { writeFileSynced } from "../store/durable.js";
import { checkImageEntry, IMAGE_METADATA_VERSION, METADATA_FILE, ROOTFS_FILE, rootfsFacts, type ImageMetadata } from "../store/images.js";
import { holderInfo } from "../store/lock.js";
import { publish } from "../store/publish.js";
import { quarantine } from "../store/quarantine.js";

const log = logger("image");


export interface ResolvedImage {
  /** The reference as given. */
  ref: string;
  manifestDigest: string;
  config: ImageConfig;
  /** The squashfs root filesystem. */
  rootfsPath: string;
  sizeBytes: number;
  /** sha256 of the root filesystem's bytes, when its entry records it (entries made before it did not). */
  sha256?: string;
}

import type { ImageProgress } from "../schema/image.js";
export type { ImageProgress };

export type { PullPolicy } from "../schema/fields.js";
import type { PullPolicy } from "../schema/fields.js";

export interface ResolveImageOptions {
  onProgress?: (p: ImageProgress) => void;
  /** supermachine home; defaults to `$SUPERMACHINE_HOME` or the user cache dir (paths.ts). */
  home?: string;
  /** Docker's meaning: pull every time / only when not present / never (default "missing"). */
  pullPolicy?: PullPolicy;
  /** Platform to select from multi-platform images (default: linux and the host's architecture). */
  platform?: Platform;
  /** Registries (host[:port]) to reach over plain HTTP; loopback registries always are. */
  insecureRegistries?: string[];
  signal?: AbortSignal;
  /** Limits for untrusted layers (defaults in flatten.ts). */
  flatten?: Pick<FlattenOptions, "maxLayerBytes" | "maxLayerEntries">;
  /**
   * The image manifest a registry tag is pinned to (a project's lockfile, src/image/pins.ts):
   * resolved as `ref@pinned`, so nothing asks the registry what the tag names now, and nothing
   * at all when the image (or its root filesystem, seeded from a cache) is already here.
   */
  pinned?: string;
}

/** Where the manifest of a reference lives, found without building anything. */
interface Located {
  digest: string;
  select: () => Promise<SelectedManifest>;
}

/**
 * Resolves `ref` to a squashfs root filesystem and its config, building and caching it on
 * first use. Concurrent callers (also across processes) building the same image wait for one
 * another and share the result.
 */
export async function resolveImage(ref: string, opts: ResolveImageOptions = {}): Promise<ResolvedImage> {
  const images = homePaths(opts.home).images;
  const located = await locate(parseImageRef(ref), opts);
  const digest = located.digest;
  const hex = digest.slice("sha256:".length); // validated by every locator
  const entryDir = join(images, hex);

  let started = 0;
  let damage: string | undefined;
  const { value: image, created } = await publish<ResolvedImage>({
    target: entryDir,
    kind: "dir",
    what: `image ${JSON.stringify(ref)} (${digest})`,
    check: async () => {
      const entry = await readCacheEntry(entryDir, digest, ref);
      if (typeof entry !== "string") return entry;
      damage = entry;
      return undefined;
    },
    // A damaged root filesystem is kept for inspection, never used again.
    moveAside: async (target) => {
      if (damage !== undefined) await quarantine(target, damage);
      else await rm(target, { recursive: true, force: true });
    },
    write: (tmpDir) => {
      started = performance.now();
      return buildInto(tmpDir, ref, located, opts);
    },
    tmpPrefix: `.tmp-${hex}-`, // the names earlier versions used, so their leftovers are removed too
    synced: true,
    onWait: (w) => {
      const holder = holderInfo(w);
      opts.onProgress?.({ phase: "waiting-for-lock", what: w.what, ...(holder ? { holder } : {}) });
    },
    ...(opts.signal ? { signal: opts.signal } : {}),
  });
  if (!created) {
    opts.onProgress?.({ phase: "cached" });
    return image;
  }
  const durationMs = performance.now() - started;
  log("image %s (%s) built in %d ms", ref, digest, Math.round(durationMs));
  opts.onProgress?.({ phase: "done", durationMs, sizeBytes: image.sizeBytes });
  return { ...image, rootfsPath: join(entryDir, ROOTFS_FILE) };
}

/** Flattens the image's layers into `tmpDir` (rootfs.sqfs, image.json), each file fsynced. */
async function buildInto(tmpDir: string, ref: string, located: Located, opts: ResolveImageOptions): Promise<ResolvedImage> {
  const selected = await located.select();
  const image = await loadImage(selected, ref);
  const onLayer = (e: { pass: 1 | 2; layer: number; layers: number; digest: string }) =>
    opts.onProgress?.({ phase: e.pass === 1 ? "scan-layer" : "copy-layer", layer: e.layer, layers: e.layers, digest: e.digest });
  const plan = await planFlatten(image.layers, { ref, onLayer, ...opts.flatten });
  opts.onProgress?.({ phase: "squashfs" });
  const sqfs = await buildSquashfs(streamFlattened(plan, { ref, onLayer, ...opts.flatten }), join(tmpDir, ROOTFS_FILE), plan.root ? { root: plan.root } : {});
  const fact = await rootfsFacts(sqfs.path);
  const meta: ImageMetadata = {
    version: IMAGE_METADATA_VERSION,
    ref,
    manifestDigest: selected.digest,
    config: image.config,
    sizeBytes: sqfs.sizeBytes,
    created: new Date().toISOString(),
    ...fact,
  };
  await writeFileSynced(join(tmpDir, METADATA_FILE), JSON.stringify(meta, null, 2) + "\n");
  return { ref, manifestDigest: selected.digest, config: image.config, rootfsPath: sqfs.path, sizeBytes: sqfs.sizeBytes, sha256: fact.sha256 };
}

/** Finds the manifest `parsed` names: in a layout, the local refs, a registry or an archive. */
async function locate(parsed: ImageRef, opts: ResolveImageOptions): Promise<Located> {
  const ref = parsed.ref;
  switch (parsed.kind) {
    case "oci":
    case "builtin": {
      const loc = locateLayout(parsed, opts.home);
      const selected = await selectManifest(loc.layoutDir, ref, loc.tag);
      return { digest: selected.digest, select: async () => selected };
    }
    case "registry":
      return locateRegistry(parsed.registry, ref, opts);
    case "docker-archive":
      return locateArchive(parsed.file, parsed.name, ref, opts);
  }
}

function fromStore(store: BlobStore, digest: string, ref: string): Located {
  return { digest, select: () => selectManifestByDigest(store.root, digest, ref) };
}

async function locateRegistry(tagged: RegistryRef, ref: string, opts: ResolveImageOptions): Promise<Located> {
  const store = BlobStore.open(opts.home);
  // A pinned tag is its digest: `name:tag@sha256:...`, the canonical form a digest reference has.
  const pinned = opts.pinned !== undefined && tagged.digest === undefined ? opts.pinned : undefined;
  const r: RegistryRef = pinned ? { ...tagged, digest: pinned, canonical: `${tagged.canonical}@${pinned}` } : tagged;
  const policy = opts.pullPolicy ?? "missing";
  const record = await readRef(r.canonical, opts.home);
  const local = record && (await store.has(record.manifestDigest)) ? record.manifestDigest : undefined;
  const pullOpts = {
    store,
    ...(opts.platform ? { platform: opts.platform } : {}),
    ...(opts.insecureRegistries ? { insecureRegistries: opts.insecureRegistries } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
    onProgress: (event: PullProgress) => opts.onProgress?.({ phase: "pull", event }),
  };
  if (policy !== "always") {
    if (local) return fromStore(store, local, ref);
    // A digest reference whose manifest (or index) is already stored needs no network either.
    if (r.digest && (await store.has(r.digest))) {
      const selected = await selectManifestByDigest(store.root, r.digest, ref); // may be an index
      return { digest: selected.digest, select: async () => selected };
    }
    const notPresent = () =>
      new ImageError("IMAGE_NOT_PRESENT", `image ${JSON.stringify(ref)} (${r.canonical}) is not present locally and pullPolicy is "never"`, {
        hint: `pull it first (supermachine pull ${pinned ? r.canonical : ref}) or use pullPolicy "missing"`,
      });
    // A pin names the platform's image manifest, the digest the image's entry is stored under:
    // when that entry exists (built here before, or seeded from a snapshot cache) the manifest
    // is never read, so it is fetched only when the entry has to be built.
    if (pinned) {
      return {
        digest: pinned,
        select: async () => {
          if (!(await store.has(pinned))) {
            if (policy === "never") throw notPresent();
            await pullPinned(r, ref, pullOpts, opts.home);
          }
          return selectManifestByDigest(store.root, pinned, ref);
        },
      };
    }
    if (policy === "never") throw notPresent();
  } else if (local) {
    const current = await resolveDigest(r, pullOpts);
    if (current === local) return fromStore(store, local, ref);
  }
  if (pinned) return fromStore(store, await pullPinned(r, ref, pullOpts, opts.home), ref);
  const pulled = await pullImage(r, pullOpts);
  const rec: RefRecord = { ref: r.canonical, manifestDigest: pulled.manifestDigest, source: "registry", pulledAt: new Date().toISOString() };
  if (pulled.indexDigest) rec.indexDigest = pulled.indexDigest;
  await writeRef(rec, opts.home);
  return fromStore(store, pulled.manifestDigest, ref);
}

/**
 * Pulls a pinned tag by its digest and names it locally (`name:tag@digest`, so `images` lists it
 * and gc keeps its blobs). The pin must be an image manifest: an index digest (a lockfile
 * edited by hand) would store the image under a digest that is not its own.
 */
async function pullPinned(r: RegistryRef, ref: string, pullOpts: PullOptions, home: string | undefined): Promise<string> {
  const pulled = await pullImage(r, pullOpts);
  if (pulled.manifestDigest !== r.digest) {
    throw new ImageError("IMAGE_PIN_INVALID", `image ${JSON.stringify(ref)} is pinned to ${r.digest}, which is not an image manifest (it led to ${pulled.manifestDigest})`, {
      hint: `a lockfile pins the image manifest of one platform: re-resolve the pin (supermachine build --update <image>)`,
    });
  }
  await writeRef({ ref: r.canonical, manifestDigest: pulled.manifestDigest, source: "registry", pulledAt: new Date().toISOString() }, home);
  return pulled.manifestDigest;
}

/**
 * What a registry tag names now, over the network (`build --update`): the digest of the image
 * manifest for `platform` (an index is followed to it), and the canonical name it was resolved as.
 */
export async function resolveTag(
  ref: string,
  opts: { platform?: Platform; insecureRegistries?: string[]; signal?: AbortSignal } = {},
): Promise<{ digest: string; canonical: string }> {
  const parsed = parseImageRef(ref);
  if (parsed.kind !== "registry" || parsed.registry.digest !== undefined) {
    throw new ImageError("IMAGE_PIN_INVALID", `image reference ${JSON.stringify(ref)} does not name a registry tag, so it has nothing to re-resolve`, {
      hint: "only registry references with a tag are pinned (name[:tag]); a @sha256: reference or a local image needs no pin",
    });
  }
  const digest = await resolveDigest(parsed.registry, {
    ...(opts.platform ? { platform: opts.platform } : {}),
    ...(opts.insecureRegistries ? { insecureRegistries: opts.insecureRegistries } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
  });
  return { digest, canonical: parsed.registry.canonical };
}

async function locateArchive(file: string, name: string | undefined, ref: string, opts: ResolveImageOptions): Promise<Located> {
  let st;
  try {
    st = await stat(file);
  } catch (cause) {
    throw new ImageError("IMAGE_ARCHIVE_NOT_FOUND", `docker archive for ${JSON.stringify(ref)} not found: ${file}`, {
      cause,
      hint: "docker-archive:<file> names a tar written by `docker save` (or `skopeo copy ... docker-archive:<file>`)",
    });
  }
  // The archive's identity is its path, name, size and mtime: a rewritten archive is re-imported.
  const key = `docker-archive:${file}:${name ?? ""}@${st.size}-${Math.round(st.mtimeMs)}`;
  const store = BlobStore.open(opts.home);
  const record = await readRef(key, opts.home);
  if (record && (await store.has(record.manifestDigest))) return fromStore(store, record.manifestDigest, ref);
  opts.onProgress?.({ phase: "import", file });
  const imported = await importDockerArchive(file, { store, ref, ...(name !== undefined ? { name } : {}) });
  await writeRef({ ref: key, manifestDigest: imported.manifestDigest, source: "docker-archive", pulledAt: new Date().toISOString() }, opts.home);
  return fromStore(store, imported.manifestDigest, ref);
}

/**
 * Returns the cached image if its metadata is readable and its rootfs has the recorded size (and,
 * when the rootfs was written since it was built, still the recorded sha256); undefined when
 * there is none or it is incomplete; a string saying why when its root filesystem is damaged.
 */
async function readCacheEntry(entryDir: string, digest: string, ref: string): Promise<ResolvedImage | string | undefined> {
  const v = await checkImageEntry(entryDir, { digest });
  if (v.status === "damaged") {
    log("cache entry %s is damaged (%s); rebuilding", entryDir, v.reason);
    return v.reason;
  }
  if (v.status !== "ok") {
    if (v.status === "invalid") log("cache entry %s is invalid (%s); rebuilding", entryDir, v.reason);
    return undefined;
  }
  const meta = v.meta;
  return { ref, manifestDigest: digest, config: meta.config, rootfsPath: join(entryDir, ROOTFS_FILE), sizeBytes: meta.sizeBytes, ...(meta.sha256 ? { sha256: meta.sha256 } : {}) };
}

/** The manifest digest `ref` resolves to, when that is known without the network. */
export async function localImageDigest(ref: string): Promise<string | undefined> {
  try {
    const parsed = parseImageRef(ref);
    if (parsed.kind === "oci" || parsed.kind === "builtin") {
      const loc = locateLayout(parsed);
      return (await selectManifest(loc.layoutDir, ref, loc.tag)).digest;
    }
    if (parsed.kind === "registry" && parsed.registry.digest === undefined) return (await readRef(parsed.registry.canonical))?.manifestDigest;
  } catch (err) {
    log("%s: no local manifest digest (%s)", ref, (err as Error).message);
  }
  return undefined;
}
