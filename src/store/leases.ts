/**
 * Leases on snapshots: a process that restores VMs from a snapshot (a pool) holds a lease on it,
 * so that gc and watch mode, in this process or another, never remove a snapshot something
 * still restores from. A lease is a file `<snapshot>.leases/<pid>-<random>`; one whose process
 * is gone is stale and ignored (and removed by whoever looks).
 */
import { randomBytes } from "node:crypto";
import { mkdirSync, readdirSync, rmSync, rmdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pidAlive } from "../process.js";

const leasesDir = (snapshotDir: string) => `${snapshotDir}.leases`;

/** Takes a lease on the snapshot at `snapshotDir`; the function returned gives it back (idempotent). */
export function holdSnapshot(snapshotDir: string): () => void {
  const dir = leasesDir(snapshotDir);
  const file = join(dir, `${process.pid}-${randomBytes(4).toString("hex")}`);
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    writeFileSync(file, "", { mode: 0o600 });
  } catch {
    return () => {}; // a read-only snapshot directory: nobody can remove it either
  }
  const release = () => {
    rmSync(file, { force: true });
    try {
      rmdirSync(dir); // only when empty
    } catch {
      /* other leases remain */
    }
    process.off("exit", release);
  };
  process.on("exit", release);
  return release;
}

/** Whether a live process holds a lease on the snapshot (stale leases are removed on the way). */
export function snapshotInUse(snapshotDir: string): boolean {
  const dir = leasesDir(snapshotDir);
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return false;
  }
  let used = false;
  for (const n of names) {
    const pid = Number(n.split("-")[0]);
    if (Number.isInteger(pid) && pidAlive(pid)) used = true;
    else rmSync(join(dir, n), { force: true });
  }
  if (!used) {
    try {
      rmdirSync(dir);
    } catch {
      /* raced with a new lease */
    }
  }
  return used;
}
