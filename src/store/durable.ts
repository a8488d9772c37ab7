/**
 * Durability helpers for the caches: data is fsynced before the rename that publishes it, and
 * the directory after, so that a crash never leaves a published entry with missing content.
 */
import { open } from "node:fs/promises";

/** fsync a file or a directory. */
export async function fsyncPath(path: string): Promise<void> {
  const fh = await open(path, "r");
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Writes `data` to `path` (created or truncated) and fsyncs it. */
export async function writeFileSynced(path: string, data: string | Buffer): Promise<void> {
  const fh = await open(path, "w");
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
}
