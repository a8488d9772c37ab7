/**
 * The store's image entries: `<images>/<manifest hex>/{rootfs.sqfs,image.json}`, one per
 * manifest digest, each a squashfs root filesystem and what it was made from. This module knows
 * the layout and how to check an entry; making one is src/image/resolve.ts's (publish under the
 * entry's lock), and moving one between machines src/transfer/'s.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import type { ImageConfig } from "../schema/image.js";

export const ROOTFS_FILE = "rootfs.sqfs";
export const METADATA_FILE = "image.json";
export const IMAGE_METADATA_VERSION = 1;

export interface ImageMetadata {
  version: number;
  ref: string;
  manifestDigest: string;
  config: ImageConfig;
  sizeBytes: number;
  created: string;
  /** sha256 of rootfs.sqfs (checked by `supermachine verify`, and on load when its mtime changed). */
  sha256?: string;
  /** rootfs.sqfs's mtime when it was written: another one means it was written since. */
  rootfsMtimeNs?: string;
}

/** What an image entry records of its root filesystem: its sha256 and mtime (read once, from the page cache). */
export async function rootfsFacts(path: string): Promise<{ sha256: string; rootfsMtimeNs: string }> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
  return { sha256: hash.digest("hex"), rootfsMtimeNs: String((await stat(path, { bigint: true })).mtimeNs) };
}

export type ImageEntryCheck =
  | { status: "ok"; meta: ImageMetadata; checked: boolean }
  | { status: "missing" }
  | { status: "invalid"; reason: string }
  | { status: "damaged"; reason: string };

/**
 * Checks an image store entry: `ok` (`checked`: its rootfs was hashed and matched), `missing`,
 * `invalid` (incomplete, another format or another digest: rebuilt without fuss), or `damaged`
 * (its root filesystem's bytes differ from the sha256 it recorded). The rootfs is hashed when
 * `full`, or when its mtime differs from the one recorded (it was written since).
 */
export async function checkImageEntry(entryDir: string, opts: { digest?: string; full?: boolean } = {}): Promise<ImageEntryCheck> {
  let meta: ImageMetadata;
  try {
    meta = JSON.parse(await readFile(join(entryDir, METADATA_FILE), "utf8")) as ImageMetadata;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return { status: "missing" };
    return { status: "invalid", reason: `its ${METADATA_FILE} cannot be read: ${(err as Error).message}` };
  }
  const rootfsPath = join(entryDir, ROOTFS_FILE);
  const st = await stat(rootfsPath, { bigint: true }).catch(() => undefined);
  if (!meta || meta.version !== IMAGE_METADATA_VERSION) return { status: "invalid", reason: `its metadata has format version ${String(meta?.version)}` };
  if (opts.digest !== undefined && meta.manifestDigest !== opts.digest) return { status: "invalid", reason: `it records image ${meta.manifestDigest}` };
  if (!st?.isFile()) return { status: "invalid", reason: `its ${ROOTFS_FILE} is missing` };
  if (Number(st.size) !== meta.sizeBytes) return { status: "damaged", reason: `its ${ROOTFS_FILE} is ${st.size} bytes, expected ${meta.sizeBytes}` };
  const written = meta.rootfsMtimeNs !== undefined && String(st.mtimeNs) !== meta.rootfsMtimeNs;
  if (meta.sha256 && (opts.full || written)) {
    const now = await rootfsFacts(rootfsPath);
    if (now.sha256 !== meta.sha256) {
      return { status: "damaged", reason: `its ${ROOTFS_FILE} does not match its sha256 (${now.sha256.slice(0, 12)}…, expected ${meta.sha256.slice(0, 12)}…)${written ? " (the file was modified after it was built)" : ""}` };
    }
    return { status: "ok", meta, checked: true };
  }
  return { status: "ok", meta, checked: false };
}
