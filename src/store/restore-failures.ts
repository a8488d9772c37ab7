/**
 * Restore failures of snapshots that check out byte for byte. A snapshot can be whole and still
 * fail every restore: garbage device state sealed with a correct checksum, a RAM file and a state
 * file that do not belong together, a snapshot made by another QEMU. Each restore that fails
 * because of what was loaded (EngineError ENGINE_RESTORE_FAILED) is recorded in the snapshot's
 * directory, so that every process using it counts towards the same total; at
 * QUARANTINE_AFTER_FAILURES the snapshot is quarantined and made again (runtime/image.ts).
 *
 * The record is `restore-failures.json` in the snapshot's directory: one JSON line per failure,
 * appended with O_APPEND (concurrent writers never lose a line, no lock needed). Each line names
 * the meta.json checksum it was counted against, so a snapshot published again in its place starts
 * from zero. A restore that succeeds removes the record: only failures in a row count.
 */
import { constants } from "node:fs";
import { open, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { logger } from "../debug.js";
import { quarantineLocked } from "./quarantine.js";
import { readSnapshotMeta } from "./snapshots.js";

const log = logger("store");

export const RESTORE_FAILURES_FILE = "restore-failures.json";
/** The failure that quarantines a snapshot: the first may be bad luck, the second is not. */
export const QUARANTINE_AFTER_FAILURES = 2;
/** More than this is not read (a record is a few hundred bytes a line). */
const MAX_RECORD = 256 * 1024;

interface FailureLine {
  checksum: string;
  at: string;
  reason: string;
  pid: number;
}

/**
 * Records one failed restore of the snapshot at `dir` (whose meta.json has `checksum`) and
 * resolves how many failures in a row it has now, this one included. When the record cannot be
 * written (a read-only snapshots directory) the failure still counts, as 1 + what was there.
 */
export async function recordRestoreFailure(dir: string, checksum: string, reason: string): Promise<number> {
  const line: FailureLine = { checksum, at: new Date().toISOString(), reason: reason.slice(0, 2000), pid: process.pid };
  const before = await restoreFailures(dir, checksum);
  try {
    const fh = await open(join(dir, RESTORE_FAILURES_FILE), constants.O_WRONLY | constants.O_APPEND | constants.O_CREAT | constants.O_NOFOLLOW, 0o600);
    try {
      await fh.write(JSON.stringify(line) + "\n");
    } finally {
      await fh.close();
    }
  } catch (err) {
    log("recording a restore failure of %s: %s", dir, (err as Error).message);
    return before + 1;
  }
  return restoreFailures(dir, checksum);
}

/** How many failed restores in a row the snapshot at `dir` with meta.json `checksum` has on record. */
export async function restoreFailures(dir: string, checksum: string): Promise<number> {
  let text: string;
  try {
    const fh = await open(join(dir, RESTORE_FAILURES_FILE), constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
    try {
      const st = await fh.stat();
      if (!st.isFile()) return 0;
      const buf = Buffer.alloc(Math.min(st.size, MAX_RECORD));
      const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
      text = buf.subarray(0, bytesRead).toString("utf8");
    } finally {
      await fh.close();
    }
  } catch {
    return 0;
  }
  let n = 0;
  for (const raw of text.split("\n")) {
    try {
      const l = JSON.parse(raw) as Partial<FailureLine>;
      if (l && l.checksum === checksum) n++;
    } catch {
      // A torn or foreign line: not a failure of this snapshot.
    }
  }
  return n;
}

/** Forgets the failures of the snapshot at `dir` (a restore from it just worked). */
export async function clearRestoreFailures(dir: string): Promise<void> {
  await rm(join(dir, RESTORE_FAILURES_FILE), { force: true }).catch((err: Error) => log("clearing the restore failures of %s: %s", dir, err.message));
}

/** The last reasons on record, newest last (for messages). */
export async function lastRestoreFailure(dir: string): Promise<string | undefined> {
  const text = await readFile(join(dir, RESTORE_FAILURES_FILE), "utf8").catch(() => "");
  const lines = text.trim().split("\n").filter(Boolean);
  try {
    return (JSON.parse(lines.at(-1) ?? "null") as FailureLine | null)?.reason;
  } catch {
    return undefined;
  }
}

/**
 * Moves the snapshot at `dir` into the quarantine because its restores keep failing, under its
 * publish lock, provided it is still the one that failed (same meta.json checksum: a snapshot
 * another process published meanwhile stays). Resolves where it went.
 */
export async function quarantineFailingSnapshot(dir: string, checksum: string, reason: string): Promise<string | undefined> {
  return quarantineLocked(dir, reason, async () => (await readSnapshotMeta(dir))?.checksum === checksum);
}
