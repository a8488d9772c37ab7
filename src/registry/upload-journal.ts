/**
 * Where a chunked blob upload stands, kept across processes: a push killed halfway through a
 * large blob leaves the upload session's location behind, and the next push of the same blob to
 * the same repository asks the registry how much of that session it holds and sends only the
 * rest. `fileUploadJournal` keeps one small JSON file per upload in a directory; entries are
 * written atomically, expire after a day (registries drop idle sessions well before that), and
 * anything unreadable, oversized or malformed is ignored as if absent.
 */
import { createHash, randomBytes } from "node:crypto";
import { constants as fsConstants } from "node:fs";
import { lstat, mkdir, open, readdir, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import { logger } from "../debug.js";

const log = logger("registry");

/** Upload session locations by key (`<registry>/<repository>@<digest>`). */
export interface UploadJournal {
  get(key: string): Promise<string | undefined>;
  set(key: string, location: string): Promise<void>;
  delete(key: string): Promise<void>;
}

/** The journal key of blob `digest` pushed to `registry/repository`. */
export function uploadJournalKey(registry: string, repository: string, digest: string): string {
  return `${registry}/${repository}@${digest}`;
}

/** Entries older than this are ignored and removed. */
export const UPLOAD_JOURNAL_TTL_MS = 24 * 60 * 60 * 1000;
/** Longest location kept (registries' upload URLs carry state, a few hundred bytes is usual). */
export const MAX_LOCATION_LENGTH = 4096;
/** Longest entry file read: a location, its key and a time fit easily. */
const MAX_ENTRY_BYTES = 16 * 1024;

interface Entry {
  key: string;
  location: string;
  /** When it was written (ms since the epoch). */
  at: number;
}

/** Whether `location` is something an upload may continue at: an http(s) URL of bounded length. */
export function validLocation(location: unknown): location is string {
  if (typeof location !== "string" || location.length === 0 || location.length > MAX_LOCATION_LENGTH) return false;
  try {
    const url = new URL(location);
    return (url.protocol === "http:" || url.protocol === "https:") && url.username === "" && url.password === "";
  } catch {
    return false;
  }
}

/** The entry in `text` when it is one for `key`, else undefined (junk, another key, a bad location). */
function parseEntry(text: string, key: string): Entry | undefined {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) return undefined;
  const e = json as Record<string, unknown>;
  if (e.key !== key || !validLocation(e.location) || typeof e.at !== "number" || !Number.isFinite(e.at)) return undefined;
  return { key, location: e.location, at: e.at };
}

/**
 * A journal in `dir` (created 0700 on first write): file `<sha256 of key>.json` per entry.
 * `now` is for tests.
 */
export function fileUploadJournal(dir: string, opts: { now?: () => number } = {}): UploadJournal {
  const now = opts.now ?? Date.now;
  const fileOf = (key: string) => join(dir, `${createHash("sha256").update(key).digest("hex")}.json`);
  const expired = (at: number) => {
    const age = now() - at;
    // A time far in the future is as untrustworthy as an old one.
    return age > UPLOAD_JOURNAL_TTL_MS || age < -UPLOAD_JOURNAL_TTL_MS;
  };
  let swept = false;

  /** Removes expired entries and temp files left by killed writers, once per journal. */
  async function sweep(): Promise<void> {
    if (swept) return;
    swept = true;
    let names: string[];
    try {
      names = await readdir(dir);
    } catch {
      return;
    }
    for (const name of names) {
      if (!/^[0-9a-f]{64}\.json$/.test(name) && !/^\.[0-9a-f]{64}\.[0-9a-f]+\.tmp$/.test(name)) continue;
      const path = join(dir, name);
      try {
        const st = await lstat(path);
        if (st.isFile() && expired(st.mtimeMs)) await rm(path, { force: true });
      } catch {
        // Gone meanwhile, or unreadable: not ours to worry about.
      }
    }
  }

  return {
    async get(key) {
      const path = fileOf(key);
      let text: string;
      try {
        // Only a regular file of bounded size is read: O_NOFOLLOW refuses a symlink put in its
        // place, O_NONBLOCK keeps a FIFO from blocking the open, and fstat rules out the rest.
        const fh = await open(path, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK);
        try {
          const st = await fh.stat();
          if (!st.isFile() || st.size > MAX_ENTRY_BYTES) return undefined;
          const buf = Buffer.alloc(st.size);
          const { bytesRead } = await fh.read(buf, 0, st.size, 0);
          text = buf.subarray(0, bytesRead).toString("utf8");
        } finally {
          await fh.close();
        }
      } catch {
        return undefined;
      }
      const entry = parseEntry(text, key);
      if (entry === undefined) {
        log("upload journal: ignoring a malformed entry for %s", key);
        return undefined;
      }
      if (expired(entry.at)) {
        await rm(path, { force: true }).catch(() => {});
        return undefined;
      }
      return entry.location;
    },

    async set(key, location) {
      if (!validLocation(location)) return;
      await mkdir(dir, { recursive: true, mode: 0o700 });
      await sweep();
      const path = fileOf(key);
      const hex = path.slice(path.lastIndexOf("/") + 1, -".json".length);
      const tmp = join(dir, `.${hex}.${randomBytes(6).toString("hex")}.tmp`);
      const entry: Entry = { key, location, at: now() };
      try {
        // "wx": never through a file or link someone else put at the temp name.
        const fh = await open(tmp, "wx", 0o600);
        try {
          await fh.writeFile(JSON.stringify(entry));
        } finally {
          await fh.close();
        }
        await rename(tmp, path);
      } catch (err) {
        await rm(tmp, { force: true }).catch(() => {});
        throw err;
      }
    },

    async delete(key) {
      await rm(fileOf(key), { force: true });
    },
  };
}
