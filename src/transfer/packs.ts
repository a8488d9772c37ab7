/**
 * Packs: blobs of zstd frames laid end to end. An exporter appends each new chunk's frame to the
 * open pack and closes it at its target size; an importer reads back only the frames it needs,
 * as byte ranges where it needs little of a pack and as the whole pack (its digest checked)
 * otherwise. A frame is checked by its consumer (decompressed to the exact length, then
 * against the sha256 of its bytes), so a range needs no digest of its own.
 */
import type { CacheBackend } from "./backend.js";
import { CacheError } from "./errors.js";
import type { FrameRef } from "./format.js";
import { sha256Of } from "./workers.js";

/** A pack being filled: its digest is known once it is closed. */
export interface PackSlot {
  digest: string | undefined;
}

export interface PendingFrame {
  slot: PackSlot;
  at: number;
  size: number;
}

export interface ClosedPack {
  digest: string;
  bytes: Buffer;
  /** How many frames it holds. */
  frames: number;
}

/** Fills packs of about `target` bytes; `onClose` gets each closed pack (and may wait: backpressure). */
export class PackWriter {
  private parts: Buffer[] = [];
  private length = 0;
  private frames = 0;
  private slot: PackSlot = { digest: undefined };

  constructor(
    private readonly target: number,
    private readonly onClose: (pack: ClosedPack) => Promise<void>,
  ) {}

  async add(frame: Buffer): Promise<PendingFrame> {
    if (this.length > 0 && this.length + frame.length > this.target) await this.close();
    const ref = { slot: this.slot, at: this.length, size: frame.length };
    this.parts.push(frame);
    this.length += frame.length;
    this.frames++;
    return ref;
  }

  async finish(): Promise<void> {
    if (this.length > 0) await this.close();
  }

  private async close(): Promise<void> {
    const bytes = Buffer.concat(this.parts, this.length);
    const digest = `sha256:${await sha256Of(bytes)}`;
    this.slot.digest = digest;
    const frames = this.frames;
    this.parts = [];
    this.length = 0;
    this.frames = 0;
    this.slot = { digest: undefined };
    await this.onClose({ digest, bytes, frames });
  }
}

/** A frame whose pack is closed. */
export function resolveFrame(f: PendingFrame): FrameRef {
  if (!f.slot.digest) throw new Error("internal: a frame of a pack that was never closed");
  return { pack: f.slot.digest, at: f.at, size: f.size };
}

export interface FrameWant {
  at: number;
  size: number;
}

/** Gaps up to this many bytes between wanted frames are read rather than split into another request. */
const RANGE_GAP = 256 * 1024;
/** More ranges than this per pack, or more than half its bytes wanted: the whole pack is cheaper. */
const MAX_RANGES = 8;

interface Span {
  start: number;
  end: number;
  frames: FrameWant[];
}

/**
 * Reads the frames `wants` of pack `digest` (`packSize` bytes, as the manifest lists it) and
 * hands each to `onFrame` with its bytes. Counts what crossed the wire in `moved`.
 */
export async function readFrames(
  backend: CacheBackend,
  digest: string,
  packSize: number,
  wants: FrameWant[],
  what: string,
  moved: { bytesMoved: number },
  onFrame: (want: FrameWant, bytes: Buffer) => Promise<void>,
  /** The whole pack, already being read (a prefetch): used instead of ranges. */
  prefetched?: Promise<Buffer | undefined>,
): Promise<void> {
  const sorted = [...wants].sort((a, b) => a.at - b.at);
  if (prefetched) {
    const bytes = await prefetched;
    if (!bytes) throw missing(backend, digest, what);
    moved.bytesMoved += bytes.length;
    await checkPack(backend, digest, packSize, bytes, what);
    return servePack(bytes, sorted, onFrame);
  }
  const spans: Span[] = [];
  const gap = backend.kind === "dir" ? 0 : RANGE_GAP;
  for (const w of sorted) {
    const last = spans[spans.length - 1];
    if (last && w.at <= last.end + gap) {
      last.end = Math.max(last.end, w.at + w.size);
      last.frames.push(w);
    } else spans.push({ start: w.at, end: w.at + w.size, frames: [w] });
  }
  const wanted = spans.reduce((a, s) => a + (s.end - s.start), 0);
  const whole = backend.kind !== "dir" && (wanted * 2 > packSize || spans.length > MAX_RANGES);
  if (whole) return servePack(await wholePack(backend, digest, packSize, what, moved), sorted, onFrame);
  for (const s of spans) {
    const got = await backend.readRange(digest, s.start, s.end - 1, packSize, what);
    if (!got) throw missing(backend, digest, what);
    moved.bytesMoved += got.bytes.length;
    if (got.start === 0 && got.bytes.length === packSize && !(s.start === 0 && s.end === packSize)) {
      // The cache ignored the range and sent the whole pack: check it whole, and use it for the rest.
      await checkPack(backend, digest, packSize, got.bytes, what);
      return servePack(got.bytes, sorted, onFrame);
    }
    if (got.start !== s.start || got.bytes.length !== s.end - s.start) {
      throw new CacheError("CACHE_DIGEST_MISMATCH", `${what}: cache ${backend.location} answered bytes ${got.start}+${got.bytes.length} of pack ${digest} for ${s.start}+${s.end - s.start}`, { hint: "the cache or a proxy in front of it mangles range requests" });
    }
    for (const f of s.frames) await onFrame(f, got.bytes.subarray(f.at - s.start, f.at - s.start + f.size));
  }
}

async function wholePack(backend: CacheBackend, digest: string, packSize: number, what: string, moved: { bytesMoved: number }): Promise<Buffer> {
  const bytes = await backend.readBlob(digest, packSize, what);
  if (!bytes) throw missing(backend, digest, what);
  moved.bytesMoved += bytes.length;
  await checkPack(backend, digest, packSize, bytes, what);
  return bytes;
}

async function checkPack(backend: CacheBackend, digest: string, packSize: number, bytes: Buffer, what: string): Promise<void> {
  // Hashed by a transfer worker: the main thread goes on receiving the other packs.
  const actual = bytes.length === packSize ? `sha256:${await sha256Of(bytes)}` : undefined;
  if (actual !== digest || bytes.length !== packSize) {
    throw new CacheError("CACHE_DIGEST_MISMATCH", `${what}: pack ${digest} in cache ${backend.location} does not hash to its digest (or is not ${packSize} bytes)`, {
      hint: "the cache holds corrupt or substituted data; nothing was imported. Export the snapshot again",
    });
  }
}

async function servePack(bytes: Buffer, wants: FrameWant[], onFrame: (want: FrameWant, bytes: Buffer) => Promise<void>): Promise<void> {
  for (const w of wants) await onFrame(w, bytes.subarray(w.at, w.at + w.size));
}

function missing(backend: CacheBackend, digest: string, what: string): CacheError {
  return new CacheError("CACHE_MISSING", `${what}: pack ${digest} is missing from cache ${backend.location}`, { hint: "the cache is incomplete: export the snapshot again" });
}
