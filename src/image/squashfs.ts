import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { rename, rm, stat } from "node:fs/promises";
import { dirname } from "node:path";
import type { Readable } from "node:stream";
import { fsyncPath } from "../store/durable.js";
import { ImageError, SetupError } from "../errors.js";
import { logger } from "../debug.js";
import type { RootAttributes } from "./flatten.js";

const log = logger("image");
const MAX_STDERR = 64 * 1024;

export interface SquashfsOptions {
  /** Root directory attributes; defaults to 0755 root:root, time 0. */
  root?: RootAttributes;
  /** Run `unsquashfs -s` on the result (default true). */
  check?: boolean;
}

export interface SquashfsResult {
  path: string;
  sizeBytes: number;
  durationMs: number;
}

/**
 * sqfstar flags. Its input must hold each path once (it keeps the first duplicate) and a
 * hardlink's target before the link; missing parent directories are created with the current
 * time, so the flattener emits them itself. `-mkfs-time 0` and fixed root attributes keep the
 * output a function of the input; file mtimes are kept.
 */
export function sqfstarArgs(out: string, root?: RootAttributes): string[] {
  const r = root ?? { mode: 0o755, uid: 0, gid: 0, mtime: 0 };
  return [
    "-comp", "lz4",
    "-quiet", "-no-progress",
    "-no-xattrs",
    "-mkfs-time", "0",
    "-root-mode", r.mode.toString(8),
    "-root-uid", String(r.uid),
    "-root-gid", String(r.gid),
    // Ignored by sqfstar 4.5.1 (the root gets the build time); honoured by later versions.
    "-root-time", String(r.mtime),
    out,
  ];
}

/**
 * Builds a squashfs at `out` from a tar stream via sqfstar: written to `<out>.tmp-<random>`,
 * fsynced, then renamed into place. Failures carry sqfstar's stderr.
 */
export async function buildSquashfs(tarStream: Readable, out: string, opts: SquashfsOptions = {}): Promise<SquashfsResult> {
  const started = performance.now();
  const tmp = `${out}.tmp-${randomBytes(6).toString("hex")}`;
  try {
    await runSqfstar(tarStream, sqfstarArgs(tmp, opts.root), out);
    if (opts.check !== false) await checkSquashfs(tmp, out);
    await fsyncPath(tmp);
    await rename(tmp, out);
    await fsyncPath(dirname(out));
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  const { size } = await stat(out);
  const durationMs = performance.now() - started;
  log("built %s (%d bytes) in %d ms", out, size, Math.round(durationMs));
  return { path: out, sizeBytes: size, durationMs };
}

function runSqfstar(tarStream: Readable, args: string[], out: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn("sqfstar", args, { stdio: ["pipe", "ignore", "pipe"] });
    let stderr = "";
    let sourceError: unknown;
    let settled = false;
    const fail = (err: unknown) => {
      if (settled) return;
      settled = true;
      reject(err);
    };
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (s: string) => {
      if (stderr.length < MAX_STDERR) stderr += s;
    });
    child.stdin.on("error", (err) => log("sqfstar stdin: %s", err.message)); // EPIPE: exit status tells
    tarStream.on("error", (err) => {
      sourceError = err;
      child.kill("SIGKILL");
    });
    tarStream.pipe(child.stdin);
    child.on("error", (err: NodeJS.ErrnoException) => {
      if (err.code === "ENOENT") {
        fail(new SetupError("SQFSTAR_NOT_FOUND", "sqfstar was not found on PATH; it is needed to build image root filesystems", {
          cause: err,
          hint: "install squashfs-tools 4.5 or newer (Debian/Ubuntu: apt-get install squashfs-tools)",
        }));
      } else {
        fail(new ImageError("IMAGE_SQUASHFS_FAILED", `could not run sqfstar to build ${out}: ${err.message}`, { cause: err }));
      }
    });
    child.on("close", (code, signal) => {
      const text = stderr.trim();
      if (text) log("sqfstar stderr: %s", text);
      if (sourceError !== undefined) return fail(sourceError);
      if (code === 0) {
        settled = true;
        return resolve();
      }
      const status = signal ? `was killed by ${signal}` : `exited with status ${code}`;
      fail(new ImageError("IMAGE_SQUASHFS_FAILED", `sqfstar ${status} while building ${out}${text ? `:\n${text}` : " (no output)"}`, {
        hint: "run with DEBUG=supermachine:image for details; the image may contain entries sqfstar cannot store",
      }));
    });
  });
}

async function checkSquashfs(path: string, out: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const child = spawn("unsquashfs", ["-s", path], { stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (s: string) => {
      if (stderr.length < MAX_STDERR) stderr += s;
    });
    child.on("error", (err: NodeJS.ErrnoException) => (err.code === "ENOENT" ? resolve() : reject(err)));
    child.on("close", (code) =>
      code === 0
        ? resolve()
        : reject(new ImageError("IMAGE_SQUASHFS_FAILED", `the squashfs built for ${out} does not read back (unsquashfs -s exited with ${code}): ${stderr.trim()}`)),
    );
  });
}

/** fsyncs a directory so a rename in it is durable. */
