/**
 * Fixed-size chunks of a (sparse) file: the unit of the RAM checksums a snapshot keeps
 * (ram-sums.ts) and of the cache transfer format (src/transfer/format.ts), which share this
 * chunking so that one can reuse the other's digests.
 */
import { createHash } from "node:crypto";
import { constants } from "node:fs";
import { open, type FileHandle } from "node:fs/promises";

/** RAM and root filesystem are cut into chunks of this size (measured: see docs/cache-format.md). */
export const CHUNK_SIZE = 16 * 1024;

const ZERO = Buffer.alloc(CHUNK_SIZE);
/** Whether `b` (at most CHUNK_SIZE bytes) is all zeroes: a memcmp, far cheaper than a loop. */
export const isZeroChunk = (b: Buffer): boolean => (b.length === ZERO.length ? b.equals(ZERO) : b.equals(ZERO.subarray(0, b.length)));

export const sha256hex = (b: Uint8Array): string => createHash("sha256").update(b).digest("hex");

export interface RawChunk {
  offset: number;
  data: Buffer;
}

/**
 * The chunks of a file in order: only the non-zero ones (all-zero chunks are holes), or every one
 * with `all`. `data` is a view into a buffer reused for the next 4 MiB: copy what must outlive
 * the iteration step (`copy: true` does). A file shorter than `size` throws `short(bytes)`.
 */
export async function* fileChunks(
  path: string,
  size: number,
  opts: { short: (got: number) => Error; all?: boolean; copy?: boolean; chunkSize?: number; direct?: boolean },
): AsyncGenerator<RawChunk> {
  const chunkSize = opts.chunkSize ?? CHUNK_SIZE;
  // `direct`: for sparse files (guest RAM, mostly holes). A buffered read of a hole fills the
  // page cache with zero pages (about 1 ms per MiB here); O_DIRECT reads holes as zeroes without
  // them (and writes back the file's dirty pages first, which a capture fsyncs anyway). Where the
  // file system or the buffer's alignment does not allow it, the read goes buffered.
  let fh = await openDirect(path, opts.direct === true);
  try {
    const span = chunkSize * Math.max(1, Math.floor((4 * 1024 * 1024) / chunkSize)); // read about 4 MiB at a time
    const buf = fh.direct ? alignedBuffer(span) : Buffer.allocUnsafe(span);
    const zero = chunkSize === CHUNK_SIZE ? ZERO : Buffer.alloc(chunkSize);
    for (let base = 0; base < size; base += span) {
      const want = Math.min(span, size - base);
      let got = 0;
      while (got < want) {
        let bytesRead: number;
        try {
          ({ bytesRead } = await fh.read(buf, got, want - got, base + got));
        } catch (err) {
          if (!fh.direct || (err as NodeJS.ErrnoException).code !== "EINVAL") throw err;
          await fh.close();
          fh = await openDirect(path, false);
          continue;
        }
        if (bytesRead === 0) throw opts.short(base + got);
        got += bytesRead;
      }
      for (let o = 0; o < want; o += chunkSize) {
        const piece = buf.subarray(o, Math.min(o + chunkSize, want));
        if (!opts.all && piece.equals(zero.subarray(0, piece.length))) continue;
        yield { offset: base + o, data: opts.copy ? Buffer.from(piece) : piece };
      }
    }
  } finally {
    await fh.close();
  }
}

/**
 * A buffer whose memory starts on a page boundary, as O_DIRECT wants: a WebAssembly memory is
 * mapped page-aligned (64 KiB pages), where a plain Buffer of this size starts just past malloc's
 * chunk header.
 */
// This project's TypeScript lib has no WebAssembly types; Node has it.
const Wasm = (globalThis as unknown as { WebAssembly: { Memory: new (d: { initial: number; maximum: number }) => { buffer: ArrayBuffer } } }).WebAssembly;

function alignedBuffer(size: number): Buffer {
  const pages = Math.ceil(size / 65536);
  return Buffer.from(new Wasm.Memory({ initial: pages, maximum: pages }).buffer, 0, size);
}

/** Opens `path` for reading, with O_DIRECT when asked and the file system takes it. */
async function openDirect(path: string, direct: boolean): Promise<FileHandle & { direct: boolean }> {
  if (direct) {
    try {
      return Object.assign(await open(path, constants.O_RDONLY | constants.O_DIRECT), { direct: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EINVAL") throw err;
    }
  }
  return Object.assign(await open(path, "r"), { direct: false });
}
