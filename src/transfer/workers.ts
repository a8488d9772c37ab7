/**
 * Chunk work off the main thread. An export compresses (and checks) every new chunk, an import
 * decompresses and checks every chunk it receives: hundreds of milliseconds of CPU for a large
 * snapshot, which on the main thread would wait for the network and make it wait in turn. Batches
 * of chunks go to a few worker threads (as many as the host has cores, at most four) while the
 * main thread reads files and talks to the cache.
 *
 * The workers run the same zstd library at the same level as zstd.ts, so a frame is byte for byte
 * what the main thread would make (packs stay content-addressed and equal across machines). Their
 * code is a string run as a CommonJS worker: it needs no build step, so it is the same under the
 * tests (TypeScript sources) and in the package. Small batches are not worth a message and run
 * on the main thread. Idle workers do not keep the process alive and stop after a few seconds.
 */
import { createHash } from "node:crypto";
import { createRequire } from "node:module";
import { availableParallelism } from "node:os";
import { Worker } from "node:worker_threads";
import { logger } from "../debug.js";
import { compress, ZSTD_LEVEL } from "./zstd.js";

const log = logger("transfer");
const require = createRequire(import.meta.url);

/** Batches smaller than this run on the calling thread (a message costs more than the work). */
export const INLINE_BYTES = 512 * 1024;
const IDLE_MS = 5_000;

/** One chunk of a batch: `size` bytes at `at` in the batch's buffer. */
export interface BatchChunk {
  at: number;
  size: number;
  /** Pack: the sha256 the chunk must have (hex), checked before it is compressed. Unpack: the sha256 the decompressed chunk must have. */
  sha256: string;
  /** Unpack: the chunk's length once decompressed. */
  length?: number;
}

export type PackResult = { ok: true; frames: Buffer; sizes: number[] } | { ok: false; index: number; why: "sha256" };
export type UnpackResult = { ok: true; raw: Buffer } | { ok: false; index: number; why: "corrupt" | "length" | "sha256"; message?: string };

const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads");
const { createHash } = require("node:crypto");
const { Compressor } = require(workerData.zstd);
const binding = require(workerData.binding);
const compressor = new Compressor();
compressor.setParameters({ compressionLevel: workerData.level });
const dctx = new binding.DCtx();
const sha = (b) => createHash("sha256").update(b).digest("hex");
parentPort.on("message", (m) => {
  if (m.op === "file") {
    const fs = require("node:fs");
    try {
      const fd = fs.openSync(m.path, "r");
      const h = createHash("sha256");
      const b = Buffer.allocUnsafe(1 << 20);
      try {
        for (let n; (n = fs.readSync(fd, b, 0, b.length, null)) > 0; ) h.update(b.subarray(0, n));
      } finally {
        fs.closeSync(fd);
      }
      parentPort.postMessage({ id: m.id, ok: true, sha256: h.digest("hex") });
    } catch (e) {
      parentPort.postMessage({ id: m.id, ok: false, message: String(e && e.message) });
    }
    return;
  }
  const buf = Buffer.from(m.buf, m.off, m.len);
  try {
    if (m.op === "sha256") {
      parentPort.postMessage({ id: m.id, ok: true, sha256: sha(buf) });
    } else if (m.op === "pack") {
      const frames = [];
      const sizes = [];
      for (let i = 0; i < m.chunks.length; i++) {
        const c = m.chunks[i];
        const data = buf.subarray(c.at, c.at + c.size);
        if (c.sha256 && sha(data) !== c.sha256) return parentPort.postMessage({ id: m.id, ok: false, index: i, why: "sha256" });
        const f = compressor.compress(data);
        frames.push(f);
        sizes.push(f.length);
      }
      const out = Buffer.concat(frames);
      const ab = out.buffer.slice(out.byteOffset, out.byteOffset + out.length);
      parentPort.postMessage({ id: m.id, ok: true, frames: ab, sizes }, [ab]);
    } else {
      let total = 0;
      for (const c of m.chunks) total += c.length;
      const ab = new ArrayBuffer(total);
      const out = Buffer.from(ab);
      let pos = 0;
      for (let i = 0; i < m.chunks.length; i++) {
        const c = m.chunks[i];
        const target = out.subarray(pos, pos + c.length);
        let got;
        try {
          got = dctx.decompress(target, buf.subarray(c.at, c.at + c.size));
        } catch (e) {
          return parentPort.postMessage({ id: m.id, ok: false, index: i, why: "corrupt", message: String(e && e.message) });
        }
        if (got !== c.length) return parentPort.postMessage({ id: m.id, ok: false, index: i, why: "length", message: String(got) });
        if (sha(target) !== c.sha256) return parentPort.postMessage({ id: m.id, ok: false, index: i, why: "sha256" });
        pos += c.length;
      }
      parentPort.postMessage({ id: m.id, ok: true, raw: ab }, [ab]);
    }
  } catch (e) {
    parentPort.postMessage({ id: m.id, ok: false, index: -1, why: "corrupt", message: String(e && e.message) });
  }
});
`;

interface Job {
  resolve: (r: unknown) => void;
  reject: (e: Error) => void;
}

class ChunkWorker {
  readonly worker: Worker;
  readonly jobs = new Map<number, Job>();
  private idle: NodeJS.Timeout | undefined;

  constructor(private readonly onGone: (w: ChunkWorker) => void) {
    this.worker = new Worker(WORKER_SOURCE, {
      eval: true,
      workerData: { zstd: require.resolve("zstd-napi"), binding: require.resolve("zstd-napi/binding.js"), level: ZSTD_LEVEL },
    });
    this.worker.unref();
    this.worker.on("message", (m: { id: number }) => {
      const job = this.jobs.get(m.id);
      if (!job) return;
      this.jobs.delete(m.id);
      job.resolve(m);
      this.settle();
    });
    const fail = (err: Error) => {
      this.onGone(this);
      for (const j of this.jobs.values()) j.reject(err);
      this.jobs.clear();
    };
    this.worker.on("error", (err) => fail(err));
    this.worker.on("exit", (code) => fail(new Error(`a transfer worker thread exited (code ${code})`)));
  }

  run(id: number, message: object, transfer: ArrayBuffer[]): Promise<unknown> {
    clearTimeout(this.idle);
    this.idle = undefined;
    // Busy: the job's answer keeps the program alive (an idle worker does not).
    this.worker.ref();
    return new Promise((resolve, reject) => {
      this.jobs.set(id, { resolve, reject });
      this.worker.postMessage(message, transfer);
    });
  }

  private settle(): void {
    if (this.jobs.size > 0) return;
    this.worker.unref();
    this.idle = setTimeout(() => {
      // Out of the pool before it goes: a job handed to it between terminate() and its exit
      // would fail with "exited (code 1)".
      this.onGone(this);
      void this.worker.terminate();
    }, IDLE_MS);
    this.idle.unref();
  }
}

let pool: ChunkWorker[] = [];
let nextId = 1;
let turn = 0;

function worker(): ChunkWorker {
  const size = Math.max(1, Math.min(4, availableParallelism()));
  if (pool.length < size) {
    const w = new ChunkWorker((gone) => (pool = pool.filter((x) => x !== gone)));
    pool.push(w);
    log("transfer worker %d of %d started", pool.length, size);
    return w;
  }
  // The least busy, ties in turn.
  let best = pool[turn++ % pool.length]!;
  for (const w of pool) if (w.jobs.size < best.jobs.size) best = w;
  return best;
}

/** A copy of `bytes` in an ArrayBuffer of its own, to hand to a worker without copying again. */
function own(bytes: Buffer): ArrayBuffer {
  return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length) as ArrayBuffer;
}

const sha256hex = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

/** The sha256 (hex) of the file at `path`, read and hashed by a worker (the main thread goes on). */
export async function sha256OfFile(path: string): Promise<string> {
  const id = nextId++;
  const m = (await worker().run(id, { id, op: "file", path }, [])) as { ok: boolean; sha256?: string; message?: string };
  if (!m.ok) throw new Error(`reading ${path}: ${m.message}`);
  return m.sha256!;
}

/** The sha256 (hex) of `bytes`, computed in a worker when they are many (a whole pack). */
export async function sha256Of(bytes: Buffer): Promise<string> {
  if (bytes.length < INLINE_BYTES) return sha256hex(bytes);
  const ab = own(bytes);
  const id = nextId++;
  const m = (await worker().run(id, { id, op: "sha256", buf: ab, off: 0, len: ab.byteLength }, [ab])) as { sha256: string };
  return m.sha256;
}

/**
 * Checks each chunk of `buf` against its sha256 (when given) and compresses it: the frames end to
 * end and their sizes, or the first chunk that does not match.
 */
export async function packChunks(buf: Buffer, chunks: BatchChunk[]): Promise<PackResult> {
  if (buf.length < INLINE_BYTES) {
    const frames: Buffer[] = [];
    for (let i = 0; i < chunks.length; i++) {
      const c = chunks[i]!;
      const data = buf.subarray(c.at, c.at + c.size);
      if (c.sha256 && sha256hex(data) !== c.sha256) return { ok: false, index: i, why: "sha256" };
      frames.push(compress(data));
    }
    return { ok: true, frames: Buffer.concat(frames), sizes: frames.map((f) => f.length) };
  }
  const ab = own(buf);
  const id = nextId++;
  const m = (await worker().run(id, { id, op: "pack", buf: ab, off: 0, len: ab.byteLength, chunks }, [ab])) as { ok: boolean; frames?: ArrayBuffer; sizes?: number[]; index?: number };
  if (!m.ok) return { ok: false, index: m.index!, why: "sha256" };
  return { ok: true, frames: Buffer.from(m.frames!), sizes: m.sizes! };
}

/**
 * Decompresses each frame of `buf` to exactly its `length` and checks it against its sha256: the
 * chunks end to end, or the first that fails and why. Never allocates more than the lengths say.
 * A small batch is done here with `inline` (which throws for a frame it cannot decompress).
 */
export async function unpackChunks(buf: Buffer, chunks: BatchChunk[], inline: (frame: Buffer, length: number, index: number) => Buffer): Promise<UnpackResult> {
  if (buf.length < INLINE_BYTES) {
    const parts: Buffer[] = [];
    for (let i = 0; i < chunks.length; i++) {
      const c = chunks[i]!;
      // `inline` throws its own error for a frame that does not decompress to the length.
      const raw = inline(buf.subarray(c.at, c.at + c.size), c.length!, i);
      if (sha256hex(raw) !== c.sha256) return { ok: false, index: i, why: "sha256" };
      parts.push(raw);
    }
    return { ok: true, raw: Buffer.concat(parts) };
  }
  const ab = own(buf);
  const id = nextId++;
  const m = (await worker().run(id, { id, op: "unpack", buf: ab, off: 0, len: ab.byteLength, chunks }, [ab])) as { ok: boolean; raw?: ArrayBuffer; index?: number; why?: "corrupt" | "length" | "sha256"; message?: string };
  if (!m.ok) return { ok: false, index: m.index!, why: m.why!, ...(m.message ? { message: m.message } : {}) };
  return { ok: true, raw: Buffer.from(m.raw!) };
}
