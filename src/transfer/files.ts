/** The chunks of a local file as the cache format cuts them (16 KiB, the store's chunking). */
import type { FileHandle } from "node:fs/promises";
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

/**
 * Positional writes gathered and sent as one `writev` per run of adjacent offsets: a file rebuilt
 * from thousands of 16 KiB chunks then costs a few system calls, not one per chunk.
 */
export class RunWriter {
  private pending: Array<{ offset: number; data: Buffer }> = [];
  private bytes = 0;

  constructor(
    private readonly fh: FileHandle,
    private readonly flushAt = 8 * 1024 * 1024,
  ) {}

  async write(data: Buffer, offset: number): Promise<void> {
    this.pending.push({ offset, data });
    this.bytes += data.length;
    if (this.bytes >= this.flushAt) await this.flush();
  }

  async flush(): Promise<void> {
    const list = this.pending.sort((a, b) => a.offset - b.offset);
    this.pending = [];
    this.bytes = 0;
    for (let i = 0; i < list.length; ) {
      let j = i + 1;
      let end = list[i]!.offset + list[i]!.data.length;
      while (j < list.length && list[j]!.offset === end && j - i < 1024) end += list[j++]!.data.length;
      await this.fh.writev(list.slice(i, j).map((w) => w.data), list[i]!.offset);
      i = j;
    }
  }
}
