/** The chunks of a local file as the cache format cuts them (16 KiB, the store's chunking). */
import { CHUNK_SIZE, fileChunks as storeFileChunks, isZeroChunk } from "../store/chunks.js";
import { CacheError } from "./errors.js";
import { sha256hex } from "../store/chunks.js";

export interface FileChunk {
  offset: number;
  /** A copy: it outlives the iteration step. */
  data: Buffer;
  /** All zeroes (only yielded with `all`). */
  zero: boolean;
}

/** The non-zero chunks of a file in order, or (`all`) every chunk, marked when all zeroes. */
export async function* fileChunks(path: string, size: number, opts: { all?: boolean } = {}): AsyncGenerator<FileChunk> {
  const short = (got: number) => new CacheError("CACHE_SNAPSHOT_INVALID", `${path} ended at ${got} bytes, expected ${size}`, { hint: "the snapshot or image is damaged: build it again" });
  for await (const { offset, data } of storeFileChunks(path, size, { copy: true, short, all: opts.all === true })) {
    yield { offset, data, zero: opts.all === true && data.length <= CHUNK_SIZE && isZeroChunk(data) };
  }
}

/** Where the bytes of a chunk can be copied from locally, by the sha256 of its bytes. */
export type LocalChunks = Map<string, { file: string; offset: number; length: number }>;

/** sha256 of every non-zero chunk of a local file → where it is. */
export async function localChunks(file: string, size: number): Promise<LocalChunks> {
  const out: LocalChunks = new Map();
  for await (const { offset, data } of fileChunks(file, size)) {
    const h = sha256hex(data);
    if (!out.has(h)) out.set(h, { file, offset, length: data.length });
  }
  return out;
}
