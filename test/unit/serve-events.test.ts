// The serve page's feeds: the event bus (per-key visibility, replay after Last-Event-ID, bounded)
// and each pool's acquire-latency and cycle series (buckets, quantiles, cycles per second).
import { describe, expect, it } from "vitest";
import { RECENT, ServerEvents, type ServerEvent } from "../../src/server/events.js";
import { BUCKET_SECONDS, PoolSeries, quantile } from "../../src/server/pool-series.js";

describe("ServerEvents", () => {
  it("shows a key its own sandbox events and everyone's bakes, replaying what came after an id", () => {
    const bus = new ServerEvents();
    bus.emit({ kind: "bake", type: "start", image: "base" });
    bus.emit({ kind: "sandbox", type: "created", sandbox: "a".repeat(20), pool: "p" }, "key-a");
    bus.emit({ kind: "sandbox", type: "created", sandbox: "b".repeat(20), pool: "p" }, "key-b");
    const seen: ServerEvent[] = [];
    const stop = bus.subscribe("key-a", 0, (e) => seen.push(e));
    expect(seen.map((e) => `${e.kind}:${e.type}`)).toEqual(["bake:start", "sandbox:created"]);
    expect(seen[1]).toMatchObject({ id: 2, at: expect.any(String) });
    bus.emit({ kind: "sandbox", type: "killed", sandbox: "b".repeat(20), pool: "p" }, "key-b");
    bus.emit({ kind: "sandbox", type: "killed", sandbox: "a".repeat(20), pool: "p" }, "key-a");
    expect(seen.map((e) => e.id)).toEqual([1, 2, 5]);
    stop();
    bus.emit({ kind: "bake", type: "start", image: "base" });
    expect(seen).toHaveLength(3);
    const after: number[] = [];
    bus.subscribe("key-a", 2, (e) => after.push(e.id))();
    expect(after).toEqual([5, 6]);
  });

  it("reads a Last-Event-ID of its own feed only", () => {
    const bus = new ServerEvents();
    const e = bus.emit({ kind: "bake", type: "start", image: "base" });
    expect(bus.sseId(e)).toBe(`${bus.instance}.1`);
    expect(bus.seenUpTo(bus.sseId(e))).toBe(1);
    expect(bus.seenUpTo(`${new ServerEvents().instance}.1`)).toBe(0);
    for (const junk of [undefined, "", "1", "x.1", `${bus.instance}.`, `${bus.instance}.-1`, `${bus.instance}.1e9`]) expect(bus.seenUpTo(junk)).toBe(0);
  });

  it("keeps the last RECENT events and tells progress only when its step changes", () => {
    const bus = new ServerEvents();
    for (let i = 0; i < RECENT + 10; i++) bus.emit({ kind: "bake", type: "start", image: `i${i}` });
    const ids: number[] = [];
    bus.subscribe("k", 0, (e) => ids.push(e.id))();
    expect(ids).toHaveLength(RECENT);
    expect(ids[0]).toBe(11);
    const steps: string[] = [];
    bus.subscribe("k", RECENT + 10, (e) => steps.push(e.type === "progress" ? e.step : e.type));
    bus.build({ type: "start", name: "app" });
    bus.build({ type: "progress", name: "app", progress: { phase: "bake", step: "warmup" } as never });
    bus.build({ type: "progress", name: "app", progress: { phase: "bake", step: "warmup" } as never });
    expect(bus.stepOf("app")).toBe("running the warmup");
    bus.build({ type: "progress", name: "app", progress: { phase: "bake", step: "capture" } as never });
    expect(steps).toEqual(["start", "running the warmup", "capturing"]);
  });
});

describe("PoolSeries", () => {
  it("buckets acquire latencies and reports p50/p99 per bucket", () => {
    let now = 1_000_000_000_000;
    const s = new PoolSeries(() => now);
    for (let i = 1; i <= 100; i++) s.acquired("p", i);
    now += BUCKET_SECONDS * 1000;
    s.acquired("p", 7);
    const r = s.report("p");
    expect(r.buckets).toHaveLength(2);
    expect(r.buckets[0]).toMatchObject({ count: 100, p50Ms: 50, p99Ms: 99 });
    expect(r.buckets[1]).toMatchObject({ count: 1, p50Ms: 7, p99Ms: 7 });
    // Ten minutes later the old buckets are gone.
    now += 11 * 60_000;
    expect(s.report("p").buckets).toEqual([]);
    expect(s.report("other")).toEqual({ bucketSeconds: BUCKET_SECONDS, buckets: [], cyclesPerSecond: 0 });
  });

  it("counts cycles per second over the last minute", () => {
    let now = 2_000_000_000_000;
    const s = new PoolSeries(() => now);
    for (let i = 0; i < 120; i++) {
      s.ended("p");
      now += 500;
    }
    // 120 cycles in 60 s, the last minute full.
    expect(s.report("p").cyclesPerSecond).toBeCloseTo(2, 0);
    expect(quantile([], 0.5)).toBeNull();
    expect(quantile([3], 0.99)).toBe(3);
  });
});
