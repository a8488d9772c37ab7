// RAM checksums (ram.sums): the ones the warm handoff's sparse copy computes while it copies must
// be exactly the ones a later verification reads back, and a same-size change must be found.
// Real files in a temp directory, no mocks.
import { randomBytes } from "node:crypto";
import { mkdtemp, open, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { sparseCopy } from "../../src/bake/handoff.js";
import { CHUNK_SIZE } from "../../src/store/chunks.js";
import { computeRamSums, decodeRamSums, encodeRamSums, verifyRam } from "../../src/store/ram-sums.js";

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "sm-ram-sums-"));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A RAM-like file: mostly zeroes, some data in and across 1 MiB copy blocks, a short last chunk. */
async function ramLike(path: string): Promise<number> {
  const size = 3 * 2 ** 20 + 5 * CHUNK_SIZE + 4096;
  const fh = await open(path, "w");
  try {
    await fh.truncate(size);
    await fh.write(randomBytes(100), 0, 100, 7); // chunk 0
    await fh.write(randomBytes(2 * CHUNK_SIZE), 0, 2 * CHUNK_SIZE, 2 ** 20 - CHUNK_SIZE); // across a 1 MiB block
    await fh.write(Buffer.from([1]), 0, 1, 2 * 2 ** 20 + 3 * CHUNK_SIZE + 11); // one byte in a zero block
    await fh.write(randomBytes(4096), 0, 4096, size - 4096); // the short last chunk
  } finally {
    await fh.close();
  }
  return size;
}

describe("RAM checksums", () => {
  it("the sparse copy's sums equal the sums read from the file, and verify its copy", async () => {
    const src = join(dir, "live");
    const dst = join(dir, "ram");
    const size = await ramLike(src);
    const fromCopy = await sparseCopy(src, dst, { sums: true });
    const fromFile = await computeRamSums(src, size);
    expect(fromCopy.size).toBe(size);
    expect(fromCopy.chunks.size).toBe(5);
    expect(encodeRamSums(fromCopy).equals(encodeRamSums(fromFile))).toBe(true);
    expect((await readFile(dst)).equals(await readFile(src))).toBe(true);
    expect(await verifyRam(dst, fromCopy)).toBeUndefined();
  });

  it("finds a change at the same size, a chunk zeroed, a chunk written where zeroes were, and a short file", async () => {
    const ram = join(dir, "ram");
    const size = await ramLike(ram);
    const encoded = encodeRamSums(await computeRamSums(ram, size));
    const sums = decodeRamSums(encoded);
    if (typeof sums === "string") throw new Error(sums);
    const original = await readFile(ram);
    const poke = async (offset: number, bytes: Buffer) => {
      const b = Buffer.from(original);
      bytes.copy(b, offset);
      await writeFile(ram, b);
    };
    await poke(2 ** 20 + 5, Buffer.from([0xff ^ original[2 ** 20 + 5]!]));
    expect(await verifyRam(ram, sums)).toMatch(/chunk 64 \(offset 1048576/);
    await poke(7, Buffer.alloc(100));
    expect(await verifyRam(ram, sums)).toMatch(/chunk 0 .*reads back as zeroes/);
    await poke(5 * CHUNK_SIZE, Buffer.from([9]));
    expect(await verifyRam(ram, sums)).toMatch(/chunk 5 .*should be all zeroes/);
    await writeFile(ram, original.subarray(0, size - 4096));
    expect(await verifyRam(ram, sums)).toMatch(/short/);
    await writeFile(ram, original);
    expect(await verifyRam(ram, sums)).toBeUndefined();
  });

  it("refuses a sums file that is not one", () => {
    expect(decodeRamSums(Buffer.from("garbage"))).toMatch(/not a RAM checksum file/);
    const s = encodeRamSums({ chunkSize: CHUNK_SIZE, size: CHUNK_SIZE * 4, chunks: new Map([[1, Buffer.alloc(32, 1)]]) });
    expect(decodeRamSums(s.subarray(0, s.length - 1))).toMatch(/length does not match/);
  });
});
