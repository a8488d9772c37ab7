/**
 * Shared pieces of the protocol fuzz tests: a time-budgeted fast-check run with a replayable
 * seed, and arbitraries for frames, fields and mutations of them.
 *
 * Replay: a failure prints `FUZZ_SEED=<seed> FUZZ_PATH=<path>`; run the same file with those
 * variables set to get the same counterexample. `FUZZ_SEED=random` explores new inputs;
 * `FUZZ_BUDGET_SCALE=4` runs each target four times longer.
 */
import fc from "fast-check";
import { FieldWriter, HEADER_SIZE, MAX_PAYLOAD, Msg } from "../../src/agent/protocol.js";

/** Default seed: CI runs the same inputs every time (a failure there is reproducible as is). */
const DEFAULT_SEED = 0x5eed_10;

export function fuzzSeed(): number {
  const s = process.env.FUZZ_SEED;
  if (s === "random") return (Math.random() * 2 ** 31) | 0;
  return s ? Number(s) : DEFAULT_SEED;
}

export function budgetMs(ms: number): number {
  return ms * Number(process.env.FUZZ_BUDGET_SCALE || 1);
}

/**
 * Runs `property` for `ms` of wall time (fewer runs on a loaded machine, never longer), from the
 * seed above. Throws fast-check's report plus the line that replays the failure.
 */
export async function fuzz<T>(file: string, name: string, property: fc.IPropertyWithHooks<T> | fc.IAsyncPropertyWithHooks<T>, ms: number): Promise<{ runs: number }> {
  const seed = fuzzSeed();
  const path = process.env.FUZZ_PATH;
  const details = await fc.check(property as fc.IAsyncPropertyWithHooks<T>, {
    seed,
    ...(path ? { path } : {}),
    numRuns: path ? 1 : 1_000_000_000,
    interruptAfterTimeLimit: budgetMs(ms),
    markInterruptAsFailure: false,
  });
  if (details.failed) {
    const cause = details.errorInstance instanceof Error ? details.errorInstance.message : String(details.errorInstance);
    const report = `${fc.defaultReportMessage(details) ?? "failed"}\n${cause}`;
    throw new Error(`${name}: ${report}\nreplay: FUZZ_SEED=${details.seed} FUZZ_PATH=${details.counterexamplePath ?? ""} npx vitest run ${file} -t '${name}'`);
  }
  if (process.env.FUZZ_VERBOSE) console.log(`${name}: ${details.numRuns} runs in ${budgetMs(ms)} ms, seed ${seed}`);
  return { runs: details.numRuns };
}

// ---- frames and fields ---------------------------------------------------------------------

export interface RawFrame {
  type: number;
  flags: number;
  stream: number;
  payload: Buffer;
}

export function encodeRaw(f: RawFrame): Buffer {
  const h = Buffer.alloc(HEADER_SIZE);
  h.writeUInt32LE(f.payload.length, 0);
  h.writeUInt8(f.type, 4);
  h.writeUInt8(f.flags, 5);
  h.writeUInt32LE(f.stream >>> 0, 8);
  return Buffer.concat([h, f.payload]);
}

/** A field value: usually the width of a fixed-size type, sometimes anything. */
const fieldValue = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom(1, 2, 4, 8).chain((n) => fc.uint8Array({ minLength: n, maxLength: n })) },
  { weight: 2, arbitrary: fc.uint8Array({ maxLength: 48 }) },
  { weight: 1, arbitrary: fc.constantFrom("true", "/tmp/x", "supermachine.0", "exec,files", "0.1.0").map((s) => new TextEncoder().encode(s)) },
);

/** A well-formed fields payload with tags that mostly mean something. */
export const fieldsPayload = fc
  .array(fc.record({ tag: fc.oneof({ weight: 5, arbitrary: fc.integer({ min: 1, max: 12 }) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 255 }) }), value: fieldValue }), { maxLength: 8 })
  .map((fields) => {
    const w = new FieldWriter();
    for (const f of fields) w.bytes(f.tag, Buffer.from(f.value));
    return w.finish();
  });

const ALL_TYPES = Object.values(Msg) as number[];

export const payloadArb = fc.oneof(
  { weight: 6, arbitrary: fieldsPayload },
  { weight: 3, arbitrary: fc.uint8Array({ maxLength: 300 }).map((b) => Buffer.from(b)) },
  // A window increment.
  { weight: 2, arbitrary: fc.integer({ min: 0, max: 0xffffffff }).map((n) => Buffer.from(new Uint32Array([n]).buffer)) },
  // Large payloads, up to the limit itself.
  { weight: 1, arbitrary: fc.oneof(fc.integer({ min: 60_000, max: 300_000 }), fc.constantFrom(MAX_PAYLOAD - 1, MAX_PAYLOAD)).map((n) => Buffer.alloc(n, 0x61)) },
);

export const frameArb = (streams: fc.Arbitrary<number> = fc.oneof(fc.integer({ min: 0, max: 12 }), fc.constant(0xffffffff), fc.nat())): fc.Arbitrary<RawFrame> =>
  fc.record({
    type: fc.oneof({ weight: 8, arbitrary: fc.constantFrom(...ALL_TYPES) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 255 }) }),
    flags: fc.oneof({ weight: 4, arbitrary: fc.constantFrom(0, 1, 2, 3, 0x80, 0x81, 0x82) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 255 }) }),
    stream: streams,
    payload: payloadArb,
  });

// ---- mutations -----------------------------------------------------------------------------

/** Where in the buffer: a fraction of its length, so a mutation shrinks independently of it. */
const at = fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true });

export type Mutation =
  | { kind: "flip"; at: number; bit: number }
  | { kind: "set"; at: number; byte: number }
  | { kind: "u32"; at: number; value: number }
  | { kind: "cut"; at: number }
  | { kind: "insert"; at: number; bytes: Uint8Array }
  | { kind: "delete"; at: number; len: number }
  | { kind: "dup"; at: number; len: number };

export const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant("flip" as const), at, bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({ kind: fc.constant("set" as const), at, byte: fc.integer({ min: 0, max: 255 }) }),
  // Lengths that matter: zero, the limit, one past it, the largest, anything.
  fc.record({ kind: fc.constant("u32" as const), at, value: fc.oneof(fc.constantFrom(0, 1, 4, MAX_PAYLOAD, MAX_PAYLOAD + 1, 0x7fffffff, 0xffffffff), fc.nat()) }),
  fc.record({ kind: fc.constant("cut" as const), at }),
  fc.record({ kind: fc.constant("insert" as const), at, bytes: fc.uint8Array({ minLength: 1, maxLength: 16 }) }),
  fc.record({ kind: fc.constant("delete" as const), at, len: fc.integer({ min: 1, max: 16 }) }),
  fc.record({ kind: fc.constant("dup" as const), at, len: fc.integer({ min: 1, max: 64 }) }),
);

export function mutate(input: Buffer, mutations: Mutation[]): Buffer {
  let b = Buffer.from(input);
  for (const m of mutations) {
    if (b.length === 0 && m.kind !== "insert") continue;
    const i = Math.floor(m.at * b.length);
    switch (m.kind) {
      case "flip":
        b[i] = b[i]! ^ (1 << m.bit);
        break;
      case "set":
        b[i] = m.byte;
        break;
      case "u32":
        if (i + 4 <= b.length) b.writeUInt32LE(m.value >>> 0, i);
        break;
      case "cut":
        b = b.subarray(0, i);
        break;
      case "insert":
        b = Buffer.concat([b.subarray(0, i), Buffer.from(m.bytes), b.subarray(i)]);
        break;
      case "delete":
        b = Buffer.concat([b.subarray(0, i), b.subarray(i + m.len)]);
        break;
      case "dup":
        b = Buffer.concat([b.subarray(0, i + m.len), b.subarray(i)]);
        break;
    }
  }
  return b;
}

const MAX_CHUNKS = 4096;

/** Split sizes, used in turn until the input is consumed: single bytes, headers cut anywhere, big reads. */
export const chunkingArb = fc.array(fc.oneof(fc.integer({ min: 1, max: 13 }), fc.integer({ min: 1, max: 70_000 }), fc.constant(1 << 20)), { minLength: 1, maxLength: 6 });

export function split(wire: Buffer, sizes: number[]): Buffer[] {
  const out: Buffer[] = [];
  for (let off = 0, k = 0; off < wire.length; k++) {
    // Past MAX_CHUNKS pieces, 64 KiB reads: a megabyte in single bytes costs a second a run
    // (the trickle itself has a test of its own).
    const n = k < MAX_CHUNKS ? sizes[k % sizes.length]! : 65_536;
    out.push(wire.subarray(off, off + n));
    off += n;
  }
  return out;
}

// ---- reference parsers, written from PROTOCOL.md -------------------------------------------

/** Frames of a whole byte stream; `error` when a header announces over MAX_PAYLOAD; `rest` bytes of a partial frame. */
export function referenceFrames(wire: Buffer): { frames: RawFrame[]; error: boolean; rest: number } {
  const frames: RawFrame[] = [];
  let off = 0;
  while (wire.length - off >= HEADER_SIZE) {
    const len = wire.readUInt32LE(off);
    if (len > MAX_PAYLOAD) return { frames, error: true, rest: 0 };
    if (wire.length - off - HEADER_SIZE < len) break;
    frames.push({ type: wire[off + 4]!, flags: wire[off + 5]!, stream: wire.readUInt32LE(off + 8), payload: wire.subarray(off + HEADER_SIZE, off + HEADER_SIZE + len) });
    off += HEADER_SIZE + len;
  }
  return { frames, error: false, rest: wire.length - off };
}

/** Fields of a payload by tag, in order; undefined when one is truncated. */
export function referenceFields(p: Buffer): Map<number, Buffer[]> | undefined {
  const m = new Map<number, Buffer[]>();
  let off = 0;
  while (off < p.length) {
    if (p.length - off < 5) return undefined;
    const tag = p[off]!;
    const len = p.readUInt32LE(off + 1);
    if (p.length - off - 5 < len) return undefined;
    const v = p.subarray(off + 5, off + 5 + len);
    m.set(tag, [...(m.get(tag) ?? []), v]);
    off += 5 + len;
  }
  return m;
}
