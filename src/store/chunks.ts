/**
 * Fixed-size chunks of a (sparse) file: the unit of the RAM checksums a snapshot keeps
 * (ram-sums.ts) and of the cache transfer format (src/transfer/format.ts), which share this
 * chunking so that one can reuse the other's digests.
 */
import { createHash } from "node:crypto";
import { open } from "node:fs/promises";

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
  opts: { short: (got: number) => Error; all?: boolean; copy?: boolean; chunkSize?: number },
): AsyncGenerator<RawChunk> {
  const chunkSize = opts.chunkSize ?? CHUNK_SIZE;
  const fh = await open(path, "r");
  try {
    const span = chunkSize * Math.max(1, Math.floor((4 * 1024 * 1024) / chunkSize)); // read about 4 MiB at a time
    const buf = Buffer.allocUnsafe(span);
    const zero = chunkSize === CHUNK_SIZE ? ZERO : Buffer.alloc(chunkSize);
    for (let base = 0; base < size; base += span) {
      const want = Math.min(span, size - base);
      let got = 0;
      while (got < want) {
        const { bytesRead } = await fh.read(buf, got, want - got, base + got);
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
