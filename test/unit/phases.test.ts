// The phase reports behind the bench's breakdowns (src/phases.ts): silent without a sink, and the
// CPU time of a process read from /proc.
import { afterEach, describe, expect, it } from "vitest";
import { phaseSince, phasesOn, processCpuMs, reportPhase, setPhaseSink } from "../../src/phases.js";

afterEach(() => setPhaseSink(undefined));

describe("phases", () => {
  it("reports to the sink only while one is set", () => {
    const got: [string, number][] = [];
    reportPhase("a", 1);
    expect(phasesOn()).toBe(false);
    setPhaseSink((p, ms) => got.push([p, ms]));
    expect(phasesOn()).toBe(true);
    reportPhase("b", 2);
    phaseSince("c", performance.now() - 5);
    setPhaseSink(undefined);
    reportPhase("d", 3);
    expect(got.map(([p]) => p)).toEqual(["b", "c"]);
    expect(got[1]![1]).toBeGreaterThanOrEqual(5);
  });

  it("reads a process's CPU time, which grows as it works", () => {
    const before = processCpuMs(process.pid)!;
    expect(before).toBeGreaterThan(0);
    // Busy until the count moves (a loaded host may give this process only part of a core).
    const until = performance.now() + 10_000;
    let x = 0;
    while (processCpuMs(process.pid)! < before + 30 && performance.now() < until) for (let i = 0; i < 1e5; i++) x += Math.sqrt(x + 1);
    expect(x).toBeGreaterThan(0);
    expect(processCpuMs(process.pid)!).toBeGreaterThanOrEqual(before + 30);
    expect(processCpuMs(2 ** 22 + 12345)).toBeUndefined();
  });
});
