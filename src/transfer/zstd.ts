/**
 * zstd for the cache format: one fixed level (equal chunks compress to equal frames, so packs of
 * equal content have equal digests) and a bounded decompressor that never allocates more than
 * the caller expects, whatever a frame from a cache claims.
 */
import { createRequire } from "node:module";
import { Compressor } from "zstd-napi";
import { CacheError } from "./errors.js";

/** One fixed level: equal chunks compress to equal frames. */
export const ZSTD_LEVEL = 3;

const binding = createRequire(import.meta.url)("zstd-napi/binding.js") as typeof import("zstd-napi/binding.js");
let compressor: Compressor | undefined;
/** One decompression context, reused: making one per frame costs more than the frame. */
let dctx: InstanceType<typeof binding.DCtx> | undefined;

export function compress(data: Uint8Array): Buffer {
  if (!compressor) {
    compressor = new Compressor();
    compressor.setParameters({ compressionLevel: ZSTD_LEVEL });
  }
  return compressor.compress(data);
}

/**
 * Decompresses `frame`, which must hold exactly `expected` bytes (or at most `max` when the size
 * is not known in advance: then the frame must declare it). Never allocates more than that.
 */
export function decompressBounded(frame: Uint8Array, what: string, size: { expected: number } | { max: number }): Buffer {
  let n: number;
  if ("expected" in size) n = size.expected;
  else {
    const declared = frameContentSize(frame);
    if (declared === null) throw new CacheError("CACHE_CHUNK_CORRUPT", `${what}: not a zstd frame that declares its size`, { hint: "the cache entry is damaged: export the snapshot again" });
    if (declared > size.max) throw new CacheError("CACHE_TOO_LARGE", `${what}: decompresses to ${declared} bytes, more than the ${size.max}-byte limit`, { hint: "the cache entry is damaged or hostile: export the snapshot again" });
    n = declared;
  }
  const out = Buffer.allocUnsafe(n);
  let got: number;
  try {
    dctx ??= new binding.DCtx();
    got = dctx.decompress(out, frame);
  } catch (cause) {
    throw new CacheError("CACHE_CHUNK_CORRUPT", `${what}: cannot be decompressed: ${(cause as Error).message}`, { cause, hint: "the cache entry is damaged: export the snapshot again" });
  }
  if (got !== n) throw new CacheError("CACHE_CHUNK_CORRUPT", `${what}: decompresses to ${got} bytes, expected ${n}`, { hint: "the cache entry is damaged: export the snapshot again" });
  return out;
}

function frameContentSize(frame: Uint8Array): number | null {
  try {
    const v = binding.getFrameContentSize(frame);
    return v === null || !Number.isSafeInteger(v) ? null : v;
  } catch {
    return null;
  }
}
