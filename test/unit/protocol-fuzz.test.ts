// Fuzzing of the host side of the agent protocol (src/agent/protocol.ts, src/agent/client.ts)
// with fast-check, for a fixed time budget: random and mutated frames, split at random points.
// The guest is untrusted, so whatever it sends, the host must:
// - throw nothing but AgentError (a TypeError or RangeError is an unvalidated read);
// - decode exactly what PROTOCOL.md says (a reference parser here is the oracle);
// - never buffer more than one frame (MAX_PAYLOAD), never deliver output past the window it
//   granted, never hang: every operation settles once the connection is closed.
// Replay a failure with the FUZZ_SEED and FUZZ_PATH it prints (test/unit/fuzz-helpers.ts).
import { EventEmitter } from "node:events";
import type { Duplex } from "node:stream";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { AgentClient } from "../../src/agent/client.js";
import { Channel, encodeFrame, FieldWriter, Fields, FLAG_EOF, FrameDecoder, FrameError, HEADER_SIZE, INITIAL_WINDOW, MAX_PAYLOAD, Msg, Tag } from "../../src/agent/protocol.js";
import { AgentError, SupermachineError } from "../../src/errors.js";
import { chunkingArb, encodeRaw, fieldsPayload, frameArb, fuzz, mutate, mutationArb, referenceFields, referenceFrames, split, type RawFrame } from "./fuzz-helpers.js";

const FILE = "test/unit/protocol-fuzz.test.ts";

/** Fails unless `err` is an AgentError the protocol code raised on purpose. */
function expectProtocolError(err: unknown): void {
  expect(err).toBeInstanceOf(AgentError);
  const cause = (err as Error).cause;
  // onData wraps anything else in an AgentError with the original as cause: that is a bug.
  if (cause !== undefined) expect(cause).toBeInstanceOf(SupermachineError);
}

describe("protocol fuzzing (host side)", () => {
  it("FrameDecoder: random and mutated streams, any split, match the reference parser", async () => {
    const wires = fc.oneof(
      fc.array(frameArb(), { maxLength: 8 }).chain((frames) =>
        fc.tuple(fc.constant(Buffer.concat(frames.map(encodeRaw))), fc.array(mutationArb, { maxLength: 4 })).map(([w, m]) => mutate(w, m)),
      ),
      fc.uint8Array({ maxLength: 600 }).map((b) => Buffer.from(b)),
    );
    const { runs } = await fuzz(
      FILE,
      "FrameDecoder",
      fc.property(wires, chunkingArb, (wire, sizes) => {
        const want = referenceFrames(wire);
        const d = new FrameDecoder();
        const got: RawFrame[] = [];
        let threw: unknown;
        for (const chunk of split(wire, sizes)) {
          try {
            got.push(...d.push(chunk));
          } catch (e) {
            threw = e;
            if (e instanceof FrameError) got.push(...e.before);
            break;
          }
          // Never more than one partial frame buffered.
          expect(d.pending).toBeLessThan(HEADER_SIZE + MAX_PAYLOAD);
        }
        expect(got.length).toBe(want.frames.length);
        got.forEach((f, i) => {
          const w = want.frames[i]!;
          expect([f.type, f.flags, f.stream, f.payload.length]).toEqual([w.type, w.flags, w.stream, w.payload.length]);
          expect(f.payload.equals(w.payload)).toBe(true);
        });
        if (want.error) {
          expectProtocolError(threw);
          expect((threw as AgentError).code).toBe("AGENT_PROTOCOL");
          // A failed decoder stays failed, with the protocol's error.
          let again: unknown;
          try {
            d.push(Buffer.alloc(1));
          } catch (e) {
            again = e;
          }
          expectProtocolError(again);
        } else {
          expect(threw).toBeUndefined();
          expect(d.pending).toBe(want.rest);
        }
      }),
      4_000,
    );
    expect(runs).toBeGreaterThan(50);
  });

  it("Fields: every accessor on random and mutated payloads throws only AgentError", async () => {
    const payloads = fc.oneof(
      fc.tuple(fieldsPayload, fc.array(mutationArb, { maxLength: 3 })).map(([p, m]) => mutate(p, m)),
      fc.uint8Array({ maxLength: 80 }).map((b) => Buffer.from(b)),
    );
    const { runs } = await fuzz(
      FILE,
      "Fields",
      fc.property(payloads, (p) => {
        const want = referenceFields(p);
        let f: Fields;
        try {
          f = new Fields(p, "FUZZ");
        } catch (e) {
          expectProtocolError(e);
          expect(want).toBeUndefined();
          return;
        }
        expect(want).toBeDefined();
        for (const tag of new Set([...want!.keys(), 0, 1, 2, 3, 255])) {
          const values = want!.get(tag) ?? [];
          expect(f.all(tag).map((b) => b.toString("hex"))).toEqual(values.map((b) => b.toString("hex")));
          const first = values[0];
          for (const [get, size] of [
            [() => f.u8(tag), 1],
            [() => f.u16(tag), 2],
            [() => f.u32(tag), 4],
            [() => f.i32(tag), 4],
            [() => f.u64(tag), 8],
          ] as const) {
            if (first === undefined) expect(get()).toBeUndefined();
            else if (first.length === size) expect(get()).not.toBeUndefined();
            else expect(get).toThrow(AgentError);
          }
          try {
            const arr = f.u64Array(tag);
            expect(arr.length * 8).toBe(first?.length ?? 0);
          } catch (e) {
            expectProtocolError(e);
            expect((first?.length ?? 0) % 8).not.toBe(0);
          }
          expect(f.string(tag)).toBe(first?.toString("utf8"));
        }
      }),
      2_500,
    );
    expect(runs).toBeGreaterThan(100);
  });

  it("AgentClient: a hostile agent's frames fail the connection cleanly, within the windows granted, and nothing hangs", async () => {
    // Stream ids the harness opens, in order (the client allocates ids from 1).
    const OPS = 8;
    const frames = fc.array(
      fc.oneof(
        { weight: 3, arbitrary: plausibleFrame(OPS) },
        { weight: 1, arbitrary: frameArb(fc.oneof(fc.integer({ min: 0, max: OPS + 1 }), fc.nat())) },
      ),
      { maxLength: 14 },
    );
    const wires = fc.tuple(frames, fc.array(mutationArb, { maxLength: 3 }), fc.boolean()).map(([fs, m, clean]) => {
      const w = Buffer.concat(fs.map(encodeRaw));
      return clean ? w : mutate(w, m);
    });
    const { runs } = await fuzz(
      FILE,
      "AgentClient",
      fc.asyncProperty(wires, chunkingArb, async (wire, sizes) => {
        const h = harness();
        for (const chunk of split(wire, sizes)) {
          // An exception escaping here would reach the socket's 'data' emitter: a crash.
          h.channel.emit("data", chunk);
        }
        const dead = h.client.dead;
        if (dead) expectProtocolError(dead);
        // Let writers waiting on credit run.
        await new Promise((r) => setImmediate(r));
        h.checkWindows();
        h.checkSent(wire);
        // Closing settles everything still in flight: nothing waits forever.
        h.client.close();
        const settled = await Promise.race([
          Promise.allSettled(h.pending).then(() => true),
          new Promise<boolean>((r) => setTimeout(() => r(false), 2_000)),
        ]);
        expect(settled, "operations still pending after close").toBe(true);
      }),
      8_000,
    );
    expect(runs).toBeGreaterThan(20);
  });

  it("regression: HELLO_OK with another version rejects the HELLO waiting for it (was: pending forever)", async () => {
    const h = harness();
    h.channel.emit("data", encodeFrame(Msg.HELLO_OK, 0, new FieldWriter().u16(Tag.helloOk.version, 1).finish()));
    await expect(within(h.pending[0]!)).rejects.toMatchObject({ code: "AGENT_VERSION" });
  });

  it("regression: an OK whose fields do not parse rejects its request (was: pending forever)", async () => {
    const h = harness();
    // Stream 8 is startWorkload: a field header cut short.
    h.channel.emit("data", encodeFrame(Msg.OK, 8, Buffer.from([3, 8, 0])));
    await expect(within(h.pending.at(-1)!)).rejects.toMatchObject({ code: "AGENT_PROTOCOL" });
    expect(h.client.dead).toBeInstanceOf(AgentError);
  });

  it("regression: frames before a bad header in the same read are still delivered", async () => {
    const h = harness();
    const exit = new FieldWriter().u32(Tag.exit.exitCode, 3).finish();
    const bad = Buffer.alloc(HEADER_SIZE, 0xff);
    h.channel.emit("data", Buffer.concat([encodeFrame(Msg.EXIT, 1, exit), bad]));
    // Exec 1 ended with its EXIT, as it would have had the garbage come in a later read.
    await expect(within(h.pending[1]!)).resolves.toMatchObject({ exitCode: 3 });
    expect(h.client.dead).toMatchObject({ code: "AGENT_PROTOCOL" });
  });

  it("regression: a 1 MiB frame trickled a byte at a time decodes in linear time", () => {
    const wire = encodeFrame(Msg.DATA, 1, Buffer.alloc(MAX_PAYLOAD, 7), Channel.STDOUT);
    const d = new FrameDecoder();
    const t0 = performance.now();
    let frames = 0;
    for (let i = 0; i < wire.length; i++) frames += d.push(wire.subarray(i, i + 1)).length;
    // Was quadratic (a copy of all buffered bytes per push): about 10 s per 100 000 bytes
    // buffered here; now about 1 µs a byte.
    expect(frames).toBe(1);
    expect(performance.now() - t0).toBeLessThan(5_000);
  });
});

/** `p`, or a rejection "still pending" after a second. */
function within<T>(p: Promise<T>, ms = 1_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`still pending after ${ms} ms`)), ms)));
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

/** Agent → host frames with the right shapes, on the harness's streams. */
function plausibleFrame(ops: number): fc.Arbitrary<RawFrame> {
  const id = fc.integer({ min: 1, max: ops });
  const f = (type: number, stream: fc.Arbitrary<number>, payload: fc.Arbitrary<Buffer>, flags: fc.Arbitrary<number> = fc.constant(0)) =>
    fc.record({ type: fc.constant(type), flags, stream, payload });
  const fields = (build: (w: FieldWriter) => FieldWriter) => fc.constant(build(new FieldWriter()).finish());
  return fc.oneof(
    f(Msg.HELLO_OK, fc.constant(0), fc.constantFrom(2, 1, 3).map((v) => new FieldWriter().u16(Tag.helloOk.version, v).bytes(Tag.helloOk.agentVersion, "0.1.0").u64(Tag.helloOk.uptimeMs, 5).bytes(Tag.helloOk.features, "exec").finish())),
    f(Msg.PONG, id, fc.uint8Array({ maxLength: 8 }).map((b) => Buffer.from(b))),
    f(Msg.STARTED, id, fields((w) => w.u32(Tag.started.pid, 42))),
    f(
      Msg.DATA,
      id,
      fc.oneof(fc.integer({ min: 0, max: 100 }), fc.integer({ min: 60_000, max: 70_000 }), fc.constant(INITIAL_WINDOW)).map((n) => Buffer.alloc(n, 0x62)),
      fc.constantFrom(0, Channel.STDOUT, Channel.STDERR, Channel.STDOUT | FLAG_EOF, Channel.STDERR | FLAG_EOF, 3),
    ),
    f(Msg.WINDOW, id, fc.integer({ min: 0, max: 0xffffffff }).map((n) => Buffer.from(new Uint32Array([n]).buffer)), fc.constantFrom(0, 1, 2)),
    f(Msg.EXIT, id, fields((w) => w.u32(Tag.exit.exitCode, 0).u32(Tag.exit.signal, 0).u8(Tag.exit.timedOut, 0).u64(Tag.exit.peakRssKib, 1n << 62n).u64(Tag.exit.durationUs, 7).u8(Tag.exit.step, 0))),
    f(Msg.OK, id, fc.oneof(fields((w) => w.u64(Tag.ok.size, 3)), fields((w) => w.u32(Tag.ok.pid, 9)), fc.array(fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }), { maxLength: 4 }).map((xs) => {
      const b = Buffer.alloc(xs.length * 8);
      xs.forEach((x, i) => b.writeBigUInt64LE(x, i * 8));
      return new FieldWriter().bytes(Tag.ok.samplesNs, b).finish();
    }))),
    f(Msg.STREAM_ERROR, id, fc.constantFrom(1, 4, 9, 200).map((c) => new FieldWriter().u32(Tag.streamError.code, c).bytes(Tag.streamError.message, "no").u32(Tag.streamError.errno, 2).finish())),
    f(Msg.GOAWAY, fc.constant(0), fields((w) => w.u32(Tag.goaway.code, 8).bytes(Tag.goaway.message, "bye"))),
  );
}

/**
 * An AgentClient on a fake channel, with one operation of every kind open (ids 1..8), output
 * counted per stream and channel, and the frames the host sends kept.
 */
function harness() {
  const channel = new (class extends EventEmitter {
    sent: Buffer[] = [];
    write(b: Buffer): boolean {
      this.sent.push(Buffer.from(b));
      return true;
    }
    destroy(): void {
      this.emit("close");
    }
  })();
  const client = new AgentClient(channel as unknown as Duplex);
  const delivered = new Map<string, number>();
  const count = (id: number, ch: number) => (n: number) => delivered.set(`${id}:${ch}`, (delivered.get(`${id}:${ch}`) ?? 0) + n);
  const pending: Promise<unknown>[] = [];
  const track = (p: Promise<unknown>) => {
    p.catch(() => {});
    pending.push(p);
  };
  track(client.hello({ entropy: Buffer.alloc(8), vmId: "fuzz" }));
  // 1: collected exec (credit returned as output arrives).
  const e1 = client.exec({ argv: ["true"], env: [] });
  e1.onStdout = (c) => count(1, 1)(c.length);
  e1.onStderr = (c) => count(1, 2)(c.length);
  track(e1.wait());
  track(e1.started);
  // 2: streaming exec that never consumes, with stdin waiting on credit.
  const e2 = client.exec({ argv: ["cat"], env: [], stdin: true }, { autoGrant: false });
  e2.onStdout = (c) => count(2, 1)(c.length);
  e2.onStderr = (c) => count(2, 2)(c.length);
  track(e2.wait());
  track(e2.write(Buffer.alloc(INITIAL_WINDOW + 10)));
  // 3: TCP.
  const t = client.tcpConnect(80);
  t.onData = (c) => count(3, 1)(c.length);
  track(t.connected);
  track(t.done);
  track(t.write(Buffer.alloc(INITIAL_WINDOW * 2)));
  // 4: a read limited to 1000 bytes; 5: a write waiting on credit.
  const r = client.openRead("/x", 1000);
  r.onData = (c) => count(4, 1)(c.length);
  track(r.done);
  const w = client.openWrite("/y", { size: 10 });
  track(w.write(Buffer.alloc(INITIAL_WINDOW + 1)));
  // 6: ping; 7: spawn bench; 8: workload.
  track(client.ping(Buffer.from([1, 2, 3])));
  track(client.spawnBench(["true"], 1));
  track(client.startWorkload({ argv: ["w"], env: [] }));
  return {
    channel,
    client,
    pending,
    /** Output delivered on a channel never exceeds the initial window plus the credit the host returned. */
    checkWindows() {
      const granted = new Map<string, number>();
      for (const f of new FrameDecoder().push(Buffer.concat(channel.sent))) {
        if (f.type === Msg.WINDOW) {
          const k = `${f.stream}:${f.flags & 3}`;
          granted.set(k, (granted.get(k) ?? 0) + f.payload.readUInt32LE(0));
        }
      }
      for (const [k, n] of delivered) expect(n, `stream:channel ${k}`).toBeLessThanOrEqual(INITIAL_WINDOW + (granted.get(k) ?? 0));
    },
    /**
     * What the host sends decodes, and its stdin DATA stays within the window the agent granted
     * (at most every WINDOW frame in `wire`: the client may have stopped reading earlier).
     */
    checkSent(wire: Buffer) {
      const frames = new FrameDecoder().push(Buffer.concat(channel.sent));
      for (const f of frames) expect(f.payload.length).toBeLessThanOrEqual(MAX_PAYLOAD);
      expect(frames[0]?.type).toBe(Msg.HELLO);
      const credit = new Map<number, number>();
      for (const f of referenceFrames(wire).frames) {
        if (f.type === Msg.WINDOW && (f.flags & 3) === 0 && f.payload.length === 4) credit.set(f.stream, (credit.get(f.stream) ?? 0) + f.payload.readUInt32LE(0));
      }
      const sent = new Map<number, number>();
      for (const f of frames) if (f.type === Msg.DATA && (f.flags & 3) === 0) sent.set(f.stream, (sent.get(f.stream) ?? 0) + f.payload.length);
      for (const [id, n] of sent) expect(n, `stdin of stream ${id}`).toBeLessThanOrEqual(INITIAL_WINDOW + (credit.get(id) ?? 0));
    },
  };
}
