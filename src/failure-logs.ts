/**
 * Logs kept for diagnosis under `<home>/logs`: the guest console of a VM that failed
 * (`vm-*.log`) and the log of a bake that failed (`bake-*.log`). Only failures leave one; a VM
 * that stops normally leaves nothing. They are private (0600, in the 0700 home), hold at most
 * the last MiB of what the guest wrote, and are pruned whenever one is kept: any older than
 * `LOG_RETENTION.maxAgeMs`, and all but the newest `LOG_RETENTION.maxFiles`.
 */
import { randomBytes } from "node:crypto";
import { closeSync, fstatSync, mkdirSync, openSync, readdirSync, readSync, rmSync, statSync, unlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { logger } from "./debug.js";
import { homePaths } from "./paths.js";
import { PRIVATE_DIR_MODE, PRIVATE_FILE_MODE } from "./private.js";

const log = logger("logs");

export const LOG_RETENTION = {
  /** Logs older than this are removed (7 days). */
  maxAgeMs: 7 * 24 * 60 * 60 * 1000,
  /** At most this many logs are kept, the newest. */
  maxFiles: 50,
  /** A console log is kept from this many bytes before its end. */
  maxBytes: 1 << 20,
};

const LOG_NAME = /^(vm|bake)-.*\.log$/;

/** A fresh path for a log of this kind (`vm`, or `bake-<image>`), not written yet. */
export function logPathFor(kind: string): string {
  const stamp = new Date().toISOString().replace(/[:.]/g, "-");
  return join(homePaths().logs, `${kind}-${stamp}-${randomBytes(3).toString("hex")}.log`);
}

/**
 * Writes a log at `path` (from `logPathFor`), 0600, then prunes the directory. `copyFrom` copies
 * the last `LOG_RETENTION.maxBytes` of a file. Returns the path, or undefined when it could not
 * be written (logged, never thrown: a log must not mask the failure it documents).
 */
export function keepLog(path: string, content: string | { copyFrom: string }): string | undefined {
  try {
    const dir = join(path, "..");
    mkdirSync(dir, { recursive: true, mode: PRIVATE_DIR_MODE });
    const data = typeof content === "string" ? content : tail(content.copyFrom, LOG_RETENTION.maxBytes);
    writeFileSync(path, data, { mode: PRIVATE_FILE_MODE, flag: "wx" });
    pruneLogs(dir);
    return path;
  } catch (err) {
    // A full disk may have left part of it: no half-written log stays behind (the path is
    // fresh, so a file there that this call did not create is only an EEXIST's).
    if ((err as NodeJS.ErrnoException).code !== "EEXIST") rmSync(path, { force: true });
    log("could not keep log %s: %s", path, (err as Error).message);
    return undefined;
  }
}

function tail(file: string, max: number): Buffer {
  const fd = openSync(file, "r");
  try {
    const size = fstatSync(fd).size;
    const len = Math.min(size, max);
    const buf = Buffer.alloc(len);
    let off = 0;
    while (off < len) {
      const n = readSync(fd, buf, off, len - off, size - len + off);
      if (n === 0) break;
      off += n;
    }
    const head = size > max ? Buffer.from(`(the first ${size - max} bytes of the console log are not kept)\n`) : Buffer.alloc(0);
    return Buffer.concat([head, buf.subarray(0, off)]);
  } finally {
    closeSync(fd);
  }
}

/** Removes logs past their age or beyond the newest `maxFiles`; returns the names removed. */
export function pruneLogs(dir: string = homePaths().logs, now = Date.now()): string[] {
  let names: string[];
  try {
    names = readdirSync(dir).filter((f) => LOG_NAME.test(f));
  } catch {
    return [];
  }
  const files = names
    .map((f) => {
      try {
        return { f, t: statSync(join(dir, f)).mtimeMs };
      } catch {
        return undefined;
      }
    })
    .filter((x) => x !== undefined)
    .sort((a, b) => b.t - a.t);
  const removed: string[] = [];
  files.forEach(({ f, t }, i) => {
    if (i < LOG_RETENTION.maxFiles && now - t <= LOG_RETENTION.maxAgeMs) return;
    try {
      unlinkSync(join(dir, f));
      removed.push(f);
    } catch {
      /* raced with another process */
    }
  });
  return removed;
}
