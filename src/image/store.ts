/**
 * Content-addressed image store: `<images>/<manifest hex>/{rootfs.sqfs,image.json}`.
 * An entry directory appears only by an atomic rename of a fully written temp directory, so a
 * present entry is complete; temp directories left by a crash are removed by the next builder
 * (which holds the per-digest lock, so nobody else can be writing them).
 */
import { randomBytes } from "node:crypto";
import { mkdir, open, readFile, readdir, rename, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import lockfile from "proper-lockfile";
import { ImageError } from "../errors.js";
import { logger } from "../log.js";
import { homePaths } from "../paths.js";
import { planFlatten, streamFlattened } from "./flatten.js";
import { loadImage, selectManifest, type ImageConfig } from "./oci-layout.js";
import { locateImage } from "./reference.js";
import { buildSquashfs, fsyncDir } from "./squashfs.js";

const log = logger("image");

export const ROOTFS_FILE = "rootfs.sqfs";
export const METADATA_FILE = "image.json";
const METADATA_VERSION = 1;

export interface ResolvedImage {
  /** The reference as given. */
  ref: string;
  manifestDigest: string;
  config: ImageConfig;
  /** The squashfs root filesystem. */
  rootfsPath: string;
  sizeBytes: number;
}

export type ImageProgress =
  | { phase: "cached" }
  | { phase: "waiting-for-lock" }
  | { phase: "scan-layer" | "copy-layer"; layer: number; layers: number; digest: string }
  | { phase: "squashfs" }
  | { phase: "done"; durationMs: number; sizeBytes: number };

export interface ResolveImageOptions {
  onProgress?: (p: ImageProgress) => void;
  /** supermachine home; defaults to `$SUPERMACHINE_HOME` or the user cache dir (paths.ts). */
  home?: string;
}

interface ImageMetadata {
  version: number;
  ref: string;
  manifestDigest: string;
  config: ImageConfig;
  sizeBytes: number;
  created: string;
}

/**
 * Resolves `ref` to a squashfs root filesystem and its config, building and caching it on
 * first use. Concurrent callers (also across processes) building the same image wait for one
 * another and share the result.
 */
export async function resolveImage(ref: string, opts: ResolveImageOptions = {}): Promise<ResolvedImage> {
  const images = homePaths(opts.home).images;
  const loc = locateImage(ref, opts.home);
  const selected = await selectManifest(loc.layoutDir, ref, loc.tag);
  const hex = selected.digest.slice("sha256:".length); // validated by selectManifest
  const entryDir = join(images, hex);

  const hit = await readCacheEntry(entryDir, selected.digest, ref);
  if (hit) {
    opts.onProgress?.({ phase: "cached" });
    return hit;
  }

  await mkdir(images, { recursive: true });
  const release = await acquireLock(images, hex, opts);
  try {
    const raced = await readCacheEntry(entryDir, selected.digest, ref);
    if (raced) {
      opts.onProgress?.({ phase: "cached" });
      return raced;
    }
    await removeStaleTemps(images, hex);
    await rm(entryDir, { recursive: true, force: true }); // an invalid entry, if any

    const started = performance.now();
    const image = await loadImage(selected, ref);
    const tmpDir = join(images, `.tmp-${hex}-${randomBytes(6).toString("hex")}`);
    await mkdir(tmpDir);
    try {
      const onLayer = (e: { pass: 1 | 2; layer: number; layers: number; digest: string }) =>
        opts.onProgress?.({ phase: e.pass === 1 ? "scan-layer" : "copy-layer", layer: e.layer, layers: e.layers, digest: e.digest });
      const plan = await planFlatten(image.layers, { ref, onLayer });
      opts.onProgress?.({ phase: "squashfs" });
      const sqfs = await buildSquashfs(streamFlattened(plan, { ref, onLayer }), join(tmpDir, ROOTFS_FILE), plan.root ? { root: plan.root } : {});
      const meta: ImageMetadata = {
        version: METADATA_VERSION,
        ref,
        manifestDigest: selected.digest,
        config: image.config,
        sizeBytes: sqfs.sizeBytes,
        created: new Date().toISOString(),
      };
      await writeFileSynced(join(tmpDir, METADATA_FILE), JSON.stringify(meta, null, 2) + "\n");
      await fsyncDir(tmpDir);
      try {
        await rename(tmpDir, entryDir);
      } catch (err) {
        // Only if our lock was taken over as stale and the other builder finished first.
        const code = (err as NodeJS.ErrnoException).code;
        const other = code === "ENOTEMPTY" || code === "EEXIST" ? await readCacheEntry(entryDir, selected.digest, ref) : undefined;
        if (!other) throw err;
        await rm(tmpDir, { recursive: true, force: true });
        return other;
      }
      await fsyncDir(images);
      const durationMs = performance.now() - started;
      log("image %s (%s) built in %d ms", ref, selected.digest, Math.round(durationMs));
      opts.onProgress?.({ phase: "done", durationMs, sizeBytes: sqfs.sizeBytes });
      return { ref, manifestDigest: selected.digest, config: image.config, rootfsPath: join(entryDir, ROOTFS_FILE), sizeBytes: sqfs.sizeBytes };
    } catch (err) {
      await rm(tmpDir, { recursive: true, force: true });
      throw err;
    }
  } finally {
    await release();
  }
}

/** Returns the cached image if its metadata is readable and its rootfs has the recorded size. */
async function readCacheEntry(entryDir: string, digest: string, ref: string): Promise<ResolvedImage | undefined> {
  let meta: ImageMetadata;
  try {
    meta = JSON.parse(await readFile(join(entryDir, METADATA_FILE), "utf8")) as ImageMetadata;
  } catch {
    return undefined;
  }
  const rootfsPath = join(entryDir, ROOTFS_FILE);
  try {
    const st = await stat(rootfsPath);
    if (meta.version !== METADATA_VERSION || meta.manifestDigest !== digest || !st.isFile() || st.size !== meta.sizeBytes) {
      log("cache entry %s is invalid; rebuilding", entryDir);
      return undefined;
    }
  } catch {
    return undefined;
  }
  return { ref, manifestDigest: digest, config: meta.config, rootfsPath, sizeBytes: meta.sizeBytes };
}

/** Takes `<images>/<hex>.lock`, waiting (up to ~10 minutes) while another process builds. */
async function acquireLock(images: string, hex: string, opts: ResolveImageOptions): Promise<() => Promise<void>> {
  const target = join(images, hex);
  const lockfilePath = join(images, `${hex}.lock`);
  const lockOpts = { realpath: false, lockfilePath, stale: 20_000, update: 5_000 };
  let compromised: Error | undefined;
  let release: () => Promise<void>;
  try {
    release = await lockfile.lock(target, { ...lockOpts, onCompromised: (err) => void (compromised = err) });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ELOCKED") throw err;
    opts.onProgress?.({ phase: "waiting-for-lock" });
    log("waiting for another process building %s", hex);
    try {
      release = await lockfile.lock(target, {
        ...lockOpts,
        retries: { retries: 600, factor: 1.3, minTimeout: 50, maxTimeout: 1_000 },
        onCompromised: (e) => void (compromised = e),
      });
    } catch (cause) {
      throw new ImageError("IMAGE_LOCK_TIMEOUT", `timed out waiting for another process to finish building image ${hex} (lock ${lockfilePath})`, {
        cause,
        hint: "if no other supermachine process is running, remove the lock directory",
      });
    }
  }
  return async () => {
    await release().catch((err: unknown) => log("releasing %s: %s", lockfilePath, (err as Error).message));
    if (compromised) log("lock %s was compromised: %s", lockfilePath, compromised.message);
  };
}

/** Removes temp dirs of `hex` left by crashed builders; the caller holds the lock for `hex`. */
async function removeStaleTemps(images: string, hex: string): Promise<void> {
  const prefix = `.tmp-${hex}-`;
  for (const name of await readdir(images)) {
    if (!name.startsWith(prefix)) continue;
    log("removing leftover %s", name);
    await rm(join(images, name), { recursive: true, force: true });
  }
}

async function writeFileSynced(path: string, data: string): Promise<void> {
  const fh = await open(path, "w");
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
}
