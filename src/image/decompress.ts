/**
 * Compression detection and streaming decompression of layer blobs and archives.
 *
 * Detection goes by magic bytes (the media type only names what the producer claimed): gzip
 * and zstd are decoded, plain data passes through, xz and bzip2 are refused. gzip is decoded
 * in-process (zlib); zstd by the `zstd` CLI as a child process (`zstd -d -c`), which is killed as
 * soon as the consumer stops reading. Every decoder is followed by a byte counter that fails
 * the stream once more than `maxBytes` came out, and backpressure keeps a decompression bomb
 * from being inflated any further than that.
 */
import { spawn } from "node:child_process";
import { open } from "node:fs/promises";
import { Duplex, Transform, pipeline, type Readable, type TransformCallback } from "node:stream";
import { createGunzip } from "node:zlib";
import { ImageError, SetupError } from "../errors.js";
import { logger } from "../debug.js";

const log = logger("image");
const MAX_STDERR = 16 * 1024;

/** Compressions we can decode. */
export type Compression = "gzip" | "zstd" | "none";

/** Bytes needed by `sniffCompression`. */
export const MAGIC_BYTES = 6;

/** What the first bytes of a blob say: a supported compression, or the name of an unsupported one. */
export function sniffCompression(head: Uint8Array): Compression | "xz" | "bzip2" {
  const starts = (...bytes: number[]) => head.length >= bytes.length && bytes.every((b, i) => head[i] === b);
  if (starts(0x1f, 0x8b)) return "gzip";
  if (starts(0x28, 0xb5, 0x2f, 0xfd)) return "zstd";
  // zstd skippable frame: 0x184D2A50..5F, little endian.
  if (head.length >= 4 && (head[0]! & 0xf0) === 0x50 && head[1] === 0x2a && head[2] === 0x4d && head[3] === 0x18) return "zstd";
  if (starts(0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00)) return "xz";
  if (starts(0x42, 0x5a, 0x68)) return "bzip2";
  return "none";
}

/**
 * Picks the decoder for a blob from its first bytes; refuses compressions we cannot decode.
 * `what` starts the error message (e.g. `image "x": layer sha256:...`).
 */
export function detectCompression(head: Uint8Array, what: string): Compression {
  const c = sniffCompression(head);
  if (c === "xz" || c === "bzip2") {
    throw new ImageError("IMAGE_LAYER_COMPRESSION_UNSUPPORTED", `${what} is ${c}-compressed, which is not supported`, {
      hint: "re-export the image with gzip, zstd or uncompressed layers (e.g. skopeo copy --dest-compress-format gzip)",
    });
  }
  return c;
}

/** Reads up to `n` bytes from the start of a file (fewer if it is shorter). Errors are fs errors. */
export async function readHead(path: string, n = MAGIC_BYTES): Promise<Buffer> {
  const fh = await open(path, "r");
  try {
    const { buffer, bytesRead } = await fh.read(Buffer.alloc(n), 0, n, 0);
    return buffer.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** The `+gzip`/`+zstd` suffix of an OCI layer media type for a compression. */
export function layerMediaType(compression: Compression): string {
  const base = "application/vnd.oci.image.layer.v1.tar";
  return compression === "none" ? base : `${base}+${compression}`;
}

export interface DecompressOptions {
  /** Fail once more than this many bytes came out of the decoder (default: no limit). */
  maxBytes?: number;
  /** Builds the error for an exceeded `maxBytes`; defaults to a generic IMAGE_LAYER_TOO_LARGE. */
  tooLarge?: (limit: number) => Error;
  /** What is being decompressed, for error messages. */
  what: string;
}

/**
 * Decodes `input` as a stream. Destroying the returned stream (or an error anywhere) destroys
 * `input` and the decoder, and kills a zstd child. A zstd that exits non-zero fails the stream
 * with its stderr; a missing `zstd` binary fails it with SetupError ZSTD_NOT_FOUND.
 */
export function decompressStream(input: Readable, compression: Compression, opts: DecompressOptions): Readable {
  const limit = opts.maxBytes ?? Infinity;
  const counter = new ByteLimit(limit, () =>
    opts.tooLarge
      ? opts.tooLarge(limit)
      : new ImageError("IMAGE_LAYER_TOO_LARGE", `${opts.what} decompresses to more than ${limit} bytes`),
  );
  const noop = () => {};
  switch (compression) {
    case "none":
      return pipeline(input, counter, noop);
    case "gzip":
      return pipeline(input, createGunzip(), counter, noop);
    case "zstd":
      return pipeline(input, zstdDecoder(opts.what), counter, noop);
  }
}

/** Counts bytes and fails with `makeError()` once more than `limit` passed. */
class ByteLimit extends Transform {
  bytes = 0;
  constructor(
    private readonly limit: number,
    private readonly makeError: () => Error,
  ) {
    super();
  }
  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.bytes += chunk.length;
    if (this.bytes > this.limit) return cb(this.makeError());
    cb(null, chunk);
  }
}

/**
 * A duplex around `zstd -d -c`: bytes written go to its stdin, its stdout is readable. The
 * readable side ends only after zstd exited with status 0, so a truncated or corrupt frame is
 * an error, never a silently short stream.
 */
export function zstdDecoder(what: string): Duplex {
  const child = spawn("zstd", ["-d", "-c", "-q", "--no-progress"], { stdio: ["pipe", "pipe", "pipe"] });
  let stderr = "";
  let pendingWrite: ((err?: Error | null) => void) | null = null;
  let stdinGone = false;
  const exited = () => child.exitCode !== null || child.signalCode !== null;

  const releaseWrite = () => {
    const cb = pendingWrite;
    pendingWrite = null;
    cb?.();
  };

  const duplex = new Duplex({
    write(chunk: Buffer, _enc, cb) {
      // Once zstd stopped reading, drop input: its exit status reports what went wrong.
      if (stdinGone) return cb();
      if (child.stdin.write(chunk)) return cb();
      pendingWrite = cb;
      child.stdin.once("drain", releaseWrite);
    },
    final(cb) {
      if (!stdinGone) child.stdin.end();
      cb();
    },
    read() {
      child.stdout.resume();
    },
    destroy(err, cb) {
      if (!exited()) {
        log("killing zstd (pid %d): the consumer stopped", child.pid);
        child.kill("SIGKILL");
      }
      child.stdin.destroy();
      child.stdout.destroy();
      releaseWrite();
      cb(err);
    },
  });

  child.stdin.on("error", (err) => log("zstd stdin: %s", err.message)); // EPIPE: exit status tells
  child.stdin.on("close", () => {
    stdinGone = true;
    releaseWrite();
  });
  child.stderr.setEncoding("utf8");
  child.stderr.on("data", (s: string) => {
    if (stderr.length < MAX_STDERR) stderr += s;
  });
  child.stdout.on("data", (chunk: Buffer) => {
    if (!duplex.push(chunk)) child.stdout.pause();
  });
  child.on("error", (err: NodeJS.ErrnoException) => {
    if (err.code === "ENOENT") {
      duplex.destroy(
        new SetupError("ZSTD_NOT_FOUND", `${what} is zstd-compressed and the zstd program was not found on PATH`, {
          cause: err,
          hint: "install zstd (Debian/Ubuntu: apt-get install zstd)",
        }),
      );
    } else {
      duplex.destroy(new ImageError("IMAGE_DECOMPRESS_FAILED", `${what}: could not run zstd: ${err.message}`, { cause: err }));
    }
  });
  child.on("close", (code, signal) => {
    if (duplex.destroyed) return;
    if (code === 0) {
      duplex.push(null);
      return;
    }
    const status = signal ? `was killed by ${signal}` : `exited with status ${code}`;
    const text = stderr.trim();
    duplex.destroy(new Error(`zstd ${status}${text ? `: ${text}` : ""}`));
  });
  return duplex;
}

