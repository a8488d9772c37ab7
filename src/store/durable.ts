/**
 * Durability helpers for the caches: data is fsynced before the rename that publishes it, and
 * the directory after, so that a crash never leaves a published entry with missing content.
 */
import { open, readdir } from "node:fs/promises";
import { join } from "node:path";

/** fsync a file or a directory. */
export async function fsyncPath(path: string): Promise<void> {
  const fh = await open(path, "r");
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Writes `data` to `path` (created 0600, or truncated) and fsyncs it. */
export async function writeFileSynced(path: string, data: string | Buffer): Promise<void> {
  const fh = await open(path, "w", 0o600);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * fsyncs every file and directory under `dir`, then `dir` itself: children before their
 * directory, so a directory is synced after the entries it names.
 */
export async function fsyncTree(dir: string): Promise<void> {
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) await fsyncTree(path);
    else if (entry.isFile()) await fsyncPath(path);
    // Symlinks and special files have no data to sync; their directory entry is synced below.
  }
  await fsyncPath(dir);
}
