/**
 * The root filesystem a snapshot was made on, on the importing machine. A snapshot is only valid
 * on those exact bytes (the guest's page cache and the squashfs superblock it read live in its
 * RAM): the image store's entry is used when it holds them (published from the cache when the
 * store lacks the image), else a private copy is rebuilt inside the snapshot.
 */
import { readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { logger } from "../debug.js";
import { homePaths } from "../paths.js";
import { METADATA_FILE, ROOTFS_FILE, rootfsFacts } from "../store/images.js";
import { publish } from "../store/publish.js";
import { CacheError } from "./errors.js";
import { LIMITS, type FileIndex, type ManifestParts } from "./format.js";
import type { Counters, ImportSession } from "./import.js";
import { fileChunks, localChunks } from "./files.js";
import { sha256hex } from "./format.js";

const log = logger("transfer");

interface ImageMetadataFile {
  version: number;
  manifestDigest: string;
  sizeBytes: number;
  sha256?: string;
}

/** The image store's entry for `digest` when it is complete: its rootfs, size and recorded sha256. */
export async function readImageEntry(entryDir: string, digest: string): Promise<{ rootfsPath: string; size: number; sha256: string | undefined } | undefined> {
  try {
    const meta = JSON.parse(await readFile(join(entryDir, METADATA_FILE), "utf8")) as ImageMetadataFile;
    const rootfsPath = join(entryDir, ROOTFS_FILE);
    const st = await stat(rootfsPath);
    if (meta.manifestDigest !== digest || !st.isFile() || st.size !== meta.sizeBytes) return undefined;
    return { rootfsPath, size: st.size, sha256: typeof meta.sha256 === "string" ? meta.sha256 : undefined };
  } catch {
    return undefined;
  }
}

/** Whether a local file holds exactly the bytes an index describes. */
async function sameAs(file: string, size: number, recorded: string | undefined, index: FileIndex): Promise<boolean> {
  if (size !== index.size) return false;
  if (recorded !== undefined && index.sha256 !== undefined) return recorded === index.sha256;
  let i = 0;
  for await (const { offset, data } of fileChunks(file, size)) {
    const ch = index.chunks[i++];
    if (!ch || ch.offset !== offset || ch.sha256 !== sha256hex(data)) return false;
  }
  return i === index.chunks.length;
}

/**
 * Makes sure the image store has the root filesystem of image `digest` (published from the
 * artifact when missing: its chunks and image.json, verified), and returns where the snapshot's
 * root filesystem is: the store's entry when it holds the bytes the index describes, else a copy
 * rebuilt into the snapshot's temp directory `tmp` (to be published as `dir`).
 */
export async function installImage(session: ImportSession, digest: string, parts: ManifestParts, index: FileIndex, tmp: string | undefined, dir: string | undefined, what: string, c: Counters): Promise<{ path: string; size: number }> {
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
      const rootfs = join(tmpDir, ROOTFS_FILE);
      await session.rebuild(rootfs, index, new Map(), parts.packs, `the root filesystem of ${what}`, c);
      // Its digest and mtime as written here (what the entry records is this machine's, as when built here).
      const facts = await rootfsFacts(rootfs);
      if (index.sha256 !== undefined && facts.sha256 !== index.sha256) {
        throw new CacheError("CACHE_CHUNK_CORRUPT", `the root filesystem of ${what} hashes to ${facts.sha256.slice(0, 16)}… once rebuilt, not to the sha256 its index records`, { hint: "the cache entry is damaged or hostile: nothing was imported" });
      }
      await writeFile(join(tmpDir, METADATA_FILE), JSON.stringify({ ...(meta as object), ...facts }, null, 2) + "\n");
      return { rootfsPath: join(entryDir, ROOTFS_FILE), size: index.size, sha256: facts.sha256 };
    },
    tmpPrefix: `.tmp-${hex}-`, // as resolveImage names its temps: either one cleans up after the other
  });
  if (created) log("image %s: root filesystem published from %s", digest, session.location);
  if (created || (await sameAs(value.rootfsPath, value.size, value.sha256, index))) return { path: value.rootfsPath, size: value.size };
  if (!tmp || !dir) throw new CacheError("CACHE_SNAPSHOT_INVALID", `the image store's ${digest} differs from the root filesystem of ${what}`);
  log("%s: the local root filesystem of %s differs from the one the snapshot was made on: keeping a copy in the snapshot", what, digest);
  await session.rebuild(join(tmp, ROOTFS_FILE), index, await localChunks(value.rootfsPath, value.size), parts.packs, `the root filesystem of ${what}`, c);
  return { path: join(dir, ROOTFS_FILE), size: index.size };
}
