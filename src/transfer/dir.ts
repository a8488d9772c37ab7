/**
 * A snapshot cache in a directory, laid out as an OCI image layout: `oci-layout`, `index.json`
 * (one entry per snapshot, annotated with its key, name and recipe key) and `blobs/sha256/<hex>`. Blobs are
 * written to a temp file, fsynced and renamed into place, and never written again once there;
 * index.json is rewritten the same way under a lock (the store's publish helper), so concurrent
 * exports into one directory keep every entry.
 */
import { randomBytes } from "node:crypto";
import { constants } from "node:fs";
import { chmod, lstat, mkdir, open, readdir, rename, rm, stat, writeFile, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import { logger } from "../debug.js";
import { isValidDigest } from "../oci/oci-layout.js";
import { fsyncPath } from "../store/durable.js";
import { publish } from "../store/publish.js";
import type { CacheBackend } from "./backend.js";
import { CacheError } from "./errors.js";
import { ANNOTATIONS, digestOf, LIMITS, MEDIA, tagOf, type ArtifactManifest } from "./format.js";

const log = logger("transfer");

interface IndexEntry {
  mediaType: string;
  artifactType?: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}

interface LayoutIndex {
  schemaVersion: 2;
  mediaType: string;
  manifests: IndexEntry[];
}

export class DirBackend implements CacheBackend {
  readonly kind = "dir" as const;
  readonly parallelism = 1;
  readonly requests = undefined;
  private readonly blobs: string;
  private readonly tmp: string;
  private ready = false;
  private dirtyBlobs = false;

  constructor(readonly location: string) {
    this.blobs = join(location, "blobs", "sha256");
    this.tmp = join(location, ".tmp");
  }

  close(): void {}

  private path(digest: string): string {
    if (!isValidDigest(digest)) throw new CacheError("CACHE_MANIFEST_INVALID", `${JSON.stringify(digest)} is not a sha256 digest (cache ${this.location})`);
    return join(this.blobs, digest.slice("sha256:".length));
  }

  private async init(): Promise<void> {
    if (this.ready) return;
    // A cache holds what guest RAM holds (the build env among it): readable by its owner only.
    await mkdir(this.blobs, { recursive: true, mode: 0o700 });
    await mkdir(this.tmp, { recursive: true, mode: 0o700 });
    await chmod(this.location, 0o700).catch(() => undefined);
    // Temps of writers that died (an hour is far longer than any write of one blob).
    for (const n of await readdir(this.tmp)) {
      const p = join(this.tmp, n);
      const st = await stat(p).catch(() => undefined);
      if (st && Date.now() - st.mtimeMs > 3_600_000) await rm(p, { force: true });
    }
    const marker = join(this.location, "oci-layout");
    if (!(await stat(marker).catch(() => undefined))) await writeFile(marker, JSON.stringify({ imageLayoutVersion: "1.0.0" }) + "\n", { mode: 0o600 });
    this.ready = true;
  }

  async blobSize(digest: string): Promise<number | undefined> {
    const st = await lstat(this.path(digest)).catch(() => undefined);
    return st?.isFile() ? st.size : undefined;
  }

  async writeBlob(digest: string, data: Buffer): Promise<void> {
    await this.init();
    const final = this.path(digest);
    const tmp = join(this.tmp, `${digest.slice(7)}-${randomBytes(6).toString("hex")}`);
    try {
      const fh = await open(tmp, "wx", 0o600);
      try {
        await fh.writeFile(data);
        await fh.sync();
      } finally {
        await fh.close();
      }
      // Same digest, same bytes: another writer's rename in between is harmless.
      await rename(tmp, final);
      this.dirtyBlobs = true;
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
  }

  async readBlob(digest: string, limit: number, what: string): Promise<Buffer | undefined> {
    const fh = await openRegular(this.path(digest), what, this.location);
    if (!fh) return undefined;
    try {
      const { size } = await fh.stat();
      if (size > limit) throw new CacheError("CACHE_TOO_LARGE", `${what} is ${size} bytes in cache ${this.location}, more than the ${limit}-byte limit`);
      const bytes = Buffer.allocUnsafe(size);
      const { bytesRead } = await fh.read(bytes, 0, size, 0);
      return bytes.subarray(0, bytesRead);
    } finally {
      await fh.close();
    }
  }

  async readRange(digest: string, start: number, end: number, _limit: number, what: string): Promise<{ bytes: Buffer; start: number } | undefined> {
    const fh = await openRegular(this.path(digest), what, this.location);
    if (!fh) return undefined;
    try {
      const { size } = await fh.stat();
      if (end >= size) throw new CacheError("CACHE_INDEX_INVALID", `${what}: bytes ${start}-${end} lie beyond the end of blob ${digest} (${size} bytes) in cache ${this.location}`, { hint: "the cache entry is damaged: export the snapshot again" });
      const bytes = Buffer.allocUnsafe(end - start + 1);
      const { bytesRead } = await fh.read(bytes, 0, bytes.length, start);
      return { bytes: bytes.subarray(0, bytesRead), start };
    } finally {
      await fh.close();
    }
  }

  private async readIndex(): Promise<LayoutIndex> {
    const file = join(this.location, "index.json");
    const fh = await openRegular(file, file, this.location);
    if (!fh) return { schemaVersion: 2, mediaType: MEDIA.index, manifests: [] };
    let text: string;
    try {
      const { size } = await fh.stat();
      if (size > LIMITS.layoutIndexBytes) throw new CacheError("CACHE_TOO_LARGE", `${file} is ${size} bytes, more than the ${LIMITS.layoutIndexBytes}-byte limit`);
      text = (await fh.readFile()).toString("utf8");
    } finally {
      await fh.close();
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch (cause) {
      throw new CacheError("CACHE_MANIFEST_INVALID", `${file} is not valid JSON`, { cause, hint: "the cache directory is damaged; remove it and export again" });
    }
    const manifests = (parsed as { manifests?: unknown }).manifests;
    if (!Array.isArray(manifests)) throw new CacheError("CACHE_MANIFEST_INVALID", `${file} has no "manifests" array`, { hint: "the cache directory is damaged; remove it and export again" });
    const ok = manifests.filter((m): m is IndexEntry => {
      const e = m as Partial<IndexEntry> | null;
      return typeof e === "object" && e !== null && isValidDigest(e.digest) && typeof e.size === "number" && (e.annotations === undefined || typeof e.annotations === "object");
    });
    return { schemaVersion: 2, mediaType: MEDIA.index, manifests: ok };
  }

  private async entryOf(key: string): Promise<IndexEntry | undefined> {
    return (await this.readIndex()).manifests.find((m) => m.annotations?.[ANNOTATIONS.key] === key);
  }

  async readManifest(key: string): Promise<Buffer | undefined> {
    const e = await this.entryOf(key);
    return e ? this.readBlob(e.digest, LIMITS.manifestBytes, `manifest of snapshot ${key}`) : undefined;
  }

  async readImageManifest(imageDigest: string): Promise<Buffer | undefined> {
    const e = (await this.readIndex()).manifests.find((m) => m.artifactType === MEDIA.artifact && m.annotations?.[ANNOTATIONS.image] === imageDigest);
    return e ? this.readBlob(e.digest, LIMITS.manifestBytes, `manifest of a snapshot of image ${imageDigest}`) : undefined;
  }

  async readRecipeManifest(recipeKey: string): Promise<Buffer | undefined> {
    // The last entry of that recipe: the one exported last (entries are appended).
    const e = (await this.readIndex()).manifests.filter((m) => m.artifactType === MEDIA.artifact && m.annotations?.[ANNOTATIONS.recipe] === recipeKey).pop();
    return e ? this.readBlob(e.digest, LIMITS.manifestBytes, `manifest of a snapshot of recipe ${recipeKey}`) : undefined;
  }

  async writeManifest(key: string, bytes: Buffer, manifest: ArtifactManifest, opts: { tagImage: boolean; recipeKey?: string | undefined }): Promise<void> {
    await this.init();
    const digest = digestOf(bytes);
    if ((await this.blobSize(digest)) !== bytes.length) await this.writeBlob(digest, bytes);
    // Blobs first, durably; the index entry that makes them a snapshot last.
    if (this.dirtyBlobs) {
      await fsyncPath(this.blobs);
      this.dirtyBlobs = false;
    }
    const a = manifest.annotations;
    const entry: IndexEntry = {
      mediaType: MEDIA.manifest,
      artifactType: MEDIA.artifact,
      digest,
      size: bytes.length,
      annotations: {
        [ANNOTATIONS.refName]: tagOf(key),
        [ANNOTATIONS.key]: key,
        ...(a[ANNOTATIONS.name] !== undefined ? { [ANNOTATIONS.name]: a[ANNOTATIONS.name] } : {}),
        ...(a[ANNOTATIONS.parent] !== undefined ? { [ANNOTATIONS.parent]: a[ANNOTATIONS.parent] } : {}),
        ...(a[ANNOTATIONS.image] !== undefined ? { [ANNOTATIONS.image]: a[ANNOTATIONS.image] } : {}),
        ...(opts.recipeKey ? { [ANNOTATIONS.recipe]: opts.recipeKey } : {}),
      },
    };
    const target = join(this.location, "index.json");
    await publish({
      target,
      kind: "file",
      what: `index of cache ${this.location}`,
      check: async () => undefined, // always rewritten: under the lock, from what is there now
      write: async (tmp) => {
        const index = await this.readIndex();
        index.manifests = [...index.manifests.filter((m) => m.annotations?.[ANNOTATIONS.key] !== key), entry];
        await writeFile(tmp, JSON.stringify(index, null, 1) + "\n", { mode: 0o600 });
        return undefined as unknown as void;
      },
      tmpDir: this.tmp,
      tmpPrefix: "index.json.tmp-",
    });
    log("cache %s: snapshot %s recorded (manifest %s)", this.location, key, digest);
  }
}

/**
 * Opens a file of the cache for reading when it is a regular file: undefined when absent; a
 * symlink (which could point at a file the cache did not supply), a FIFO or a device is refused
 * without reading it or waiting on it.
 */
async function openRegular(path: string, what: string, location: string): Promise<FileHandle | undefined> {
  let fh: FileHandle;
  try {
    fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return undefined;
    if (code === "ELOOP") throw notRegular(what, location, "a symbolic link");
    throw err;
  }
  const st = await fh.stat();
  if (!st.isFile()) {
    await fh.close();
    throw notRegular(what, location, st.isFIFO() ? "a FIFO" : st.isDirectory() ? "a directory" : "not a regular file");
  }
  return fh;
}

function notRegular(what: string, location: string, kind: string): CacheError {
  return new CacheError("CACHE_MANIFEST_INVALID", `${what} in cache ${location} is ${kind}; a cache holds regular files only`, { hint: "the cache directory was tampered with: remove it and export again" });
}
