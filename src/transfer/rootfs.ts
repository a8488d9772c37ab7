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
import { METADATA_FILE, ROOTFS_FILE } from "../store/images.js";
import { sha256OfFile } from "./workers.js";
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
 * Where the snapshot's root filesystem is on this machine: the image store's entry when it holds
 * exactly the bytes the index describes; else, with `publish` (a signed artifact), the store's
 * entry published from the artifact when the store lacks the image (its packs and image.json,
 * verified); else a copy rebuilt into the snapshot's temp directory `tmp` (to be published as
 * `dir`), so that what an unsigned cache brought stays in the snapshot it came with.
 */
export async function installImage(
  session: ImportSession,
  digest: string,
  parts: ManifestParts,
  index: FileIndex,
  to: { tmp?: string; dir?: string; publish: boolean },
  what: string,
  c: Counters,
): Promise<{ path: string; size: number }> {
  const hex = digest.slice("sha256:".length);
  const entryDir = join(homePaths().images, hex);
  const label = `the root filesystem of ${what}`;
  let entry = await readImageEntry(entryDir, digest);
  if (!entry && to.publish) {
    const { value, created } = await publish({
      target: entryDir,
      kind: "dir",
      what: `image ${digest} (root filesystem from cache ${session.location})`,
      check: () => readImageEntry(entryDir, digest),
      write: async (tmpDir) => {
        const metaLabel = `the image metadata of ${what}`;
        // Fetched while the root filesystem is rebuilt (one round trip less), checked before it is used.
        const metaP = session.fetchVerified(parts.imageMeta, LIMITS.imageMetaBytes, metaLabel, c);
        metaP.catch(() => undefined);
        const rootfs = join(tmpDir, ROOTFS_FILE);
        await session.rebuild(rootfs, index, new Map(), parts.packs, label, c);
        const metaBytes = await metaP;
        let meta: ImageMetadataFile;
        try {
          meta = JSON.parse(metaBytes.toString("utf8")) as ImageMetadataFile;
        } catch (cause) {
          throw new CacheError("CACHE_CONFIG_INVALID", `${metaLabel} is not valid JSON`, { cause });
        }
        if (meta?.manifestDigest !== digest || meta.sizeBytes !== index.size || typeof meta.version !== "number") {
          throw new CacheError("CACHE_CONFIG_INVALID", `${metaLabel} describes image ${JSON.stringify(meta?.manifestDigest)} of ${meta?.sizeBytes} bytes, expected ${digest} of ${index.size}`);
        }
        // Its digest and mtime as written here (what the entry records is this machine's, as when built here).
        const facts = await checkedFacts(rootfs, index, label);
        await writeFile(join(tmpDir, METADATA_FILE), JSON.stringify({ ...(meta as object), ...facts }, null, 2) + "\n");
        return { rootfsPath: join(entryDir, ROOTFS_FILE), size: index.size, sha256: facts.sha256 };
      },
      tmpPrefix: `.tmp-${hex}-`, // as resolveImage names its temps: either one cleans up after the other
    });
    if (created) {
      log("image %s: root filesystem published from %s", digest, session.location);
      return { path: value.rootfsPath, size: value.size };
    }
    entry = value;
  }
  if (entry && (await sameAs(entry.rootfsPath, entry.size, entry.sha256, index))) return { path: entry.rootfsPath, size: entry.size };
  if (!to.tmp || !to.dir) throw new CacheError("CACHE_SNAPSHOT_INVALID", `the image store's ${digest} differs from ${label}`);
  log("%s: %s: keeping a copy in the snapshot", what, entry ? "the local root filesystem differs from the one it was made on" : "an unsigned cache does not add images to the image store");
  const copy = join(to.tmp, ROOTFS_FILE);
  await session.rebuild(copy, index, entry ? await localChunks(entry.rootfsPath, entry.size) : new Map(), parts.packs, label, c);
  await checkedFacts(copy, index, label);
  return { path: join(to.dir, ROOTFS_FILE), size: index.size };
}

/** A rebuilt root filesystem's facts, its sha256 checked against the one its index records. */
async function checkedFacts(path: string, index: FileIndex, label: string): Promise<{ sha256: string; rootfsMtimeNs: string }> {
  // As the image store's rootfsFacts computes them, the hashing in a transfer worker.
  const facts = { sha256: await sha256OfFile(path), rootfsMtimeNs: String((await stat(path, { bigint: true })).mtimeNs) };
  if (index.sha256 !== undefined && facts.sha256 !== index.sha256) {
    throw new CacheError("CACHE_CHUNK_CORRUPT", `${label} does not hash, once rebuilt, to the sha256 its index records`, { hint: "the cache entry is damaged or hostile: nothing was imported" });
  }
  return facts;
}
