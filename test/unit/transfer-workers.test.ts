// The transfer workers: frames made in a worker thread are byte for byte the main thread's (packs
// stay content-addressed), checksums are checked on both sides, and a hostile frame (garbage, or
// one that decompresses to more than its chunk) is refused without allocating beyond the length.
import { createHash, randomBytes } from "node:crypto";
import { describe, expect, it, vi } from "vitest";
import { INLINE_BYTES, packChunks, sha256Of, unpackChunks, type BatchChunk } from "../../src/transfer/workers.js";
import { compress, decompressBounded } from "../../src/transfer/zstd.js";

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");
const inline = (f: Buffer, n: number) => decompressBounded(f, "a test chunk", { expected: n });

/** `n` 16 KiB chunks, half random, half a repeated byte (compressible). */
function batch(n: number): { buf: Buffer; chunks: BatchChunk[]; parts: Buffer[] } {
  const parts = Array.from({ length: n }, (_, i) => Buffer.concat([randomBytes(8192), Buffer.alloc(8192, i)]));
  return { buf: Buffer.concat(parts), parts, chunks: parts.map((p, i) => ({ at: i * 16384, size: 16384, sha256: sha(p) })) };
}

function framesOf(r: { frames: Buffer; sizes: number[] }, parts: Buffer[]): BatchChunk[] {
  let at = 0;
  return r.sizes.map((size, i) => {
    const c = { at, size, sha256: sha(parts[i]!), length: parts[i]!.length };
    at += size;
    return c;
  });
}

describe("transfer workers", () => {
  it.each([["in a worker", 64], ["inline (a small batch)", 4]])("compress %s exactly as the main thread does, and decompress back", async (_how, n) => {
    const { buf, chunks, parts } = batch(n);
    expect(buf.length >= INLINE_BYTES).toBe(n === 64);
    const r = await packChunks(buf, chunks);
    if (!r.ok) throw new Error("not packed");
    expect(r.frames.equals(Buffer.concat(parts.map((p) => compress(p))))).toBe(true);
    const u = await unpackChunks(r.frames, framesOf(r, parts), inline);
    expect(u.ok && u.raw.equals(buf)).toBe(true);
  });

  it("names the first chunk that does not match its checksum, packing or unpacking", async () => {
    const { buf, chunks, parts } = batch(64);
    const bad = chunks.map((c, i) => (i === 17 ? { ...c, sha256: "0".repeat(64) } : c));
    expect(await packChunks(buf, bad)).toEqual({ ok: false, index: 17, why: "sha256" });
    const r = await packChunks(buf, chunks);
    if (!r.ok) throw new Error("not packed");
    const frames = framesOf(r, parts);
    frames[40] = { ...frames[40]!, sha256: "1".repeat(64) };
    expect(await unpackChunks(r.frames, frames, inline)).toEqual({ ok: false, index: 40, why: "sha256" });
  });

  it("refuses garbage and a frame that decompresses to more than its chunk", async () => {
    const { buf, chunks, parts } = batch(64);
    const r = await packChunks(buf, chunks);
    if (!r.ok) throw new Error("not packed");
    const frames = framesOf(r, parts);
    // A bomb: a frame of 64 MiB of zeroes claimed as a 16 KiB chunk.
    const bomb = compress(Buffer.alloc(64 * 1024 * 1024));
    const withBomb = Buffer.concat([r.frames, bomb]);
    const bombed = [...frames, { at: r.frames.length, size: bomb.length, sha256: sha(Buffer.alloc(16384)), length: 16384 }];
    expect(await unpackChunks(withBomb, bombed, inline)).toMatchObject({ ok: false, index: 64, why: "corrupt" });
    const garbage = Buffer.from(r.frames);
    garbage.fill(0x41, frames[3]!.at, frames[3]!.at + 16);
    expect(await unpackChunks(garbage, frames, inline)).toMatchObject({ ok: false, index: 3, why: "corrupt" });
  });
  it("hands no job to a worker that its idle timer is ending (it would fail with exit code 1)", async () => {
    const big = randomBytes(INLINE_BYTES * 2);
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout"] });
    try {
      // Every worker of the pool runs a job, goes idle, and its idle timer fires...
      await Promise.all(Array.from({ length: 4 }, () => sha256Of(big)));
      vi.advanceTimersByTime(10_000);
      // ...and jobs given right after, before the workers' exits are seen, still run.
      const sums = await Promise.all(Array.from({ length: 4 }, () => sha256Of(big)));
      expect(sums).toEqual(Array(4).fill(sha(big)));
    } finally {
      vi.useRealTimers();
    }
  });
});
