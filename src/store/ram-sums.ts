/**
 * Per-chunk checksums of a snapshot's RAM file (`ram.sums` beside it), computed when the
 * snapshot is sealed: the sha256 of every non-zero chunk (the cache transfer's chunking, so an
 * export checks its chunks against them and an import writes them from its chunk index). Every
 * chunk not listed must be all zeroes. Verifying a RAM file reads it once (about 0.1 s for a
 * 256 MiB guest, mostly holes).
 *
 * Binary, little-endian: "SMRAMSUM" (8 bytes), version u32, chunk size u32, file size u64,
 * count u32, then per listed chunk its index (u32, offset / chunk size) and sha256 (32 bytes).
 */
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { CHUNK_SIZE, fileChunks } from "./chunks.js";

export const RAM_SUMS_FILE = "ram.sums";
const MAGIC = Buffer.from("SMRAMSUM");
const VERSION = 1;
const HEADER = 8 + 4 + 4 + 8 + 4;
const ENTRY = 4 + 32;

export interface RamSums {
  chunkSize: number;
  size: number;
  /** Chunk index (offset / chunkSize) → sha256, for every non-zero chunk, in order. */
  chunks: Map<number, Buffer>;
}

/** What meta.json records of the sums file: its own digest, so that it is checked too. */
export interface RamSumsRecord {
  sha256: string;
  chunks: number;
  chunkSize: number;
}

class ShortFile extends Error {}

/** The checksums of `path` (read once). */
export async function computeRamSums(path: string, size: number, chunkSize = CHUNK_SIZE): Promise<RamSums> {
  const chunks = new Map<number, Buffer>();
  for await (const { offset, data } of fileChunks(path, size, { chunkSize, direct: true, short: (got) => new ShortFile(`${path} ended at ${got} bytes, expected ${size}`) })) {
    chunks.set(offset / chunkSize, createHash("sha256").update(data).digest());
  }
  return { chunkSize, size, chunks };
}

/** The sums of a chunk index (transfer import): every listed chunk's sha256 by offset. */
export function ramSumsFrom(index: { chunkSize: number; size: number; chunks: { offset: number; sha256: string }[] }): RamSums {
  const chunks = new Map<number, Buffer>();
  const zero = (n: number) => createHash("sha256").update(Buffer.alloc(n)).digest("hex");
  const zeroFull = zero(index.chunkSize);
  for (const c of index.chunks) {
    // A listed chunk of zeroes is a hole like any other (the sums list non-zero chunks only).
    const length = Math.min(index.chunkSize, index.size - c.offset);
    if (c.sha256 === (length === index.chunkSize ? zeroFull : zero(length))) continue;
    chunks.set(c.offset / index.chunkSize, Buffer.from(c.sha256, "hex"));
  }
  return { chunkSize: index.chunkSize, size: index.size, chunks };
}

export function encodeRamSums(s: RamSums): Buffer {
  const out = Buffer.alloc(HEADER + ENTRY * s.chunks.size);
  MAGIC.copy(out, 0);
  out.writeUInt32LE(VERSION, 8);
  out.writeUInt32LE(s.chunkSize, 12);
  out.writeBigUInt64LE(BigInt(s.size), 16);
  out.writeUInt32LE(s.chunks.size, 24);
  let at = HEADER;
  for (const i of [...s.chunks.keys()].sort((a, b) => a - b)) {
    out.writeUInt32LE(i, at);
    s.chunks.get(i)!.copy(out, at + 4);
    at += ENTRY;
  }
  return out;
}

/** Parses a sums file; a reason string when it is not one (damaged). */
export function decodeRamSums(b: Buffer): RamSums | string {
  if (b.length < HEADER || !b.subarray(0, 8).equals(MAGIC)) return "it is not a RAM checksum file";
  if (b.readUInt32LE(8) !== VERSION) return `it has format version ${b.readUInt32LE(8)}`;
  const chunkSize = b.readUInt32LE(12);
  const size = Number(b.readBigUInt64LE(16));
  const count = b.readUInt32LE(24);
  if (chunkSize === 0 || chunkSize % 4096 !== 0 || b.length !== HEADER + ENTRY * count) return "its length does not match its header";
  const chunks = new Map<number, Buffer>();
  let last = -1;
  for (let k = 0, at = HEADER; k < count; k++, at += ENTRY) {
    const i = b.readUInt32LE(at);
    if (i <= last || i * chunkSize >= size) return `entry ${k} names chunk ${i}, out of order or past the end`;
    chunks.set(i, b.subarray(at + 4, at + ENTRY));
    last = i;
  }
  return { chunkSize, size, chunks };
}

export function recordOf(encoded: Buffer, s: RamSums): RamSumsRecord {
  return { sha256: createHash("sha256").update(encoded).digest("hex"), chunks: s.chunks.size, chunkSize: s.chunkSize };
}

/** Reads `sumsPath` and checks it against its record; the sums, or why they cannot be used. */
export async function readRamSums(sumsPath: string, record: RamSumsRecord): Promise<RamSums | string> {
  let bytes: Buffer;
  try {
    bytes = await readFile(sumsPath);
  } catch {
    return `its RAM checksums (${RAM_SUMS_FILE}) are missing`;
  }
  if (createHash("sha256").update(bytes).digest("hex") !== record.sha256) return `its RAM checksums (${RAM_SUMS_FILE}) do not match the digest meta.json records`;
  const s = decodeRamSums(bytes);
  return typeof s === "string" ? `its RAM checksums (${RAM_SUMS_FILE}) are damaged: ${s}` : s;
}

/**
 * Reads the RAM file and compares every chunk with the sums. Resolves undefined when it matches,
 * else the first difference (which chunk, at what offset).
 */
export async function verifyRam(path: string, sums: RamSums): Promise<string | undefined> {
  const at = (i: number) => `chunk ${i} (offset ${i * sums.chunkSize}, ${((i * sums.chunkSize) / 2 ** 20).toFixed(1)} MiB)`;
  const listed = [...sums.chunks.keys()].sort((a, b) => a - b);
  let next = 0; // the next listed chunk not seen yet
  try {
    // Non-zero chunks in order: each must be the next listed one and hash to its sum.
    for await (const { offset, data } of fileChunks(path, sums.size, { chunkSize: sums.chunkSize, direct: true, short: (got) => new ShortFile(`it ends at ${got} bytes, expected ${sums.size}`) })) {
      const i = offset / sums.chunkSize;
      if (next < listed.length && listed[next]! < i) return `its RAM differs from its checksums at ${at(listed[next]!)}: the chunk reads back as zeroes`;
      if (listed[next] !== i) return `its RAM differs from its checksums at ${at(i)}: the chunk should be all zeroes`;
      if (!createHash("sha256").update(data).digest().equals(sums.chunks.get(i)!)) return `its RAM differs from its checksums at ${at(i)}`;
      next++;
    }
  } catch (err) {
    if (err instanceof ShortFile) return `its RAM file is short: ${err.message}`;
    throw err;
  }
  if (next < listed.length) return `its RAM differs from its checksums at ${at(listed[next]!)}: the chunk reads back as zeroes`;
  return undefined;
}
