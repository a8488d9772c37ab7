/**
 * A local copy of snapshot config blobs this machine wrote to or read from a cache, by digest
 * (`$SUPERMACHINE_HOME/transfer/configs/<hex>`). An export of a child needs its parent's config
 * (where each of the parent's chunks is, to reference them rather than send them again); when
 * this machine exported or imported that parent, the copy saves the round trip of reading it back.
 * Content-addressed and checked on every read, so a damaged copy is only a miss.
 */
import { randomBytes } from "node:crypto";
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { logger } from "../debug.js";
import { homePaths } from "../paths.js";
import { digestOf, LIMITS } from "./format.js";

const log = logger("transfer");
/** Copies kept; the oldest beyond this are removed when one is added. */
const KEEP = 256;

const dirOf = () => join(homePaths().home, "transfer", "configs");

/** The config blob `digest`, when a verified copy is here. */
export async function readConfigCopy(digest: string, size: number): Promise<Buffer | undefined> {
  if (size > LIMITS.configBytes) return undefined;
  try {
    const bytes = await readFile(join(dirOf(), digest.slice("sha256:".length)));
    return bytes.length === size && digestOf(bytes) === digest ? bytes : undefined;
  } catch {
    return undefined;
  }
}

/** Keeps a copy of a config blob (best effort: a failure only costs a later round trip). */
export async function keepConfigCopy(digest: string, bytes: Buffer): Promise<void> {
  try {
    const dir = dirOf();
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const final = join(dir, digest.slice("sha256:".length));
    const tmp = `${final}.tmp-${randomBytes(6).toString("hex")}`;
    await writeFile(tmp, bytes, { mode: 0o600 });
    await rename(tmp, final);
    const names = (await readdir(dir)).filter((n) => !n.includes(".tmp-"));
    if (names.length > KEEP) {
      const aged = await Promise.all(names.map(async (n) => ({ n, t: (await stat(join(dir, n)).catch(() => undefined))?.mtimeMs ?? 0 })));
      aged.sort((a, b) => a.t - b.t);
      for (const { n } of aged.slice(0, names.length - KEEP)) await rm(join(dir, n), { force: true });
    }
  } catch (err) {
    log("config copy %s not kept: %s", digest, (err as Error).message);
  }
}
