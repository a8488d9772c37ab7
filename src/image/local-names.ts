/**
 * Local names of images that came from a registry or an archive, or were tagged (tag.ts): which
 * manifest a reference resolved to when it was pulled, imported or tagged. One small JSON file
 * per canonical reference, replaced atomically (store/publish.ts: temp, fsync, rename, under a
 * lock), so `pullPolicy: "missing"` answers from disk without touching the network.
 */
import { createHash } from "node:crypto";
import { readdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { homePaths } from "../paths.js";
import { publish } from "../store/publish.js";
import { isValidDigest } from "../oci/oci-layout.js";

export interface RefRecord {
  /** Canonical reference (`docker.io/library/alpine:latest`, `docker-archive:/abs/file.tar:name`). */
  ref: string;
  /** The platform image manifest the reference resolved to. */
  manifestDigest: string;
  /** The index the registry served for the reference, when it was one. */
  indexDigest?: string;
  /** How the name was made: a pull, an archive import, or `tagImage` (a name given locally). */
  source: "registry" | "docker-archive" | "tag";
  pulledAt: string;
}

const fileFor = (dir: string, ref: string) => join(dir, `${createHash("sha256").update(ref).digest("hex").slice(0, 40)}.json`);

export async function readRef(ref: string, home?: string): Promise<RefRecord | undefined> {
  try {
    const rec = JSON.parse(await readFile(fileFor(homePaths(home).refs, ref), "utf8")) as RefRecord;
    return rec.ref === ref && isValidDigest(rec.manifestDigest) ? rec : undefined;
  } catch {
    return undefined;
  }
}

export async function writeRef(rec: RefRecord, home?: string): Promise<void> {
  await publish({
    target: fileFor(homePaths(home).refs, rec.ref),
    kind: "file",
    what: `ref ${rec.ref}`,
    check: async () => undefined, // a ref is replaced on every write: no existing record is kept
    write: (tmp) => writeFile(tmp, JSON.stringify(rec, null, 2) + "\n", { flag: "wx" }),
  });
}

export async function removeRef(ref: string, home?: string): Promise<boolean> {
  const path = fileFor(homePaths(home).refs, ref);
  try {
    await rm(path);
    return true;
  } catch {
    return false;
  }
}

export async function listRefs(home?: string): Promise<RefRecord[]> {
  const dir = homePaths(home).refs;
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return [];
  }
  const out: RefRecord[] = [];
  for (const n of names) {
    if (!n.endsWith(".json")) continue;
    try {
      const rec = JSON.parse(await readFile(join(dir, n), "utf8")) as RefRecord;
      if (isValidDigest(rec.manifestDigest)) out.push(rec);
    } catch {
      /* a half-written file cannot exist (rename), but a foreign one may: skip it */
    }
  }
  return out.sort((a, b) => a.ref.localeCompare(b.ref));
}
