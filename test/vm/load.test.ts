// Load on real microVMs: many callers on a small pool, many VMs started and stopped, many execs
// on one VM; each proves that what the host process holds (fds, child processes, runtime
// directories, temp files, handles, memory) comes back to where it was.
import { readdirSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { concurrentAcquires, hostResources, privateTempDirs, quiesce, runExecSoak, vmLoop, type HostResources } from "../../bench/load.js";
import { Image } from "../../src/index.js";

let dirs: ReturnType<typeof privateTempDirs>;
let image: Image;
let baseline: HostResources;

beforeAll(async () => {
  // Private temp and runtime directories: anything the library leaves in them is a leak of ours.
  dirs = privateTempDirs();
  image = await Image.build({ ref: "builtin:busybox" });
  // One VM through a pool first, so lazily created handles (the exit hook, loggers) exist.
  const pool = await image.pool({ min: 1, max: 1 });
  await (await pool.acquire()).release();
  await pool.shutdown();
  baseline = hostResources();
});

afterAll(() => {
  dirs?.restore();
});

/** Nothing held beyond the baseline: no fd, child, runtime dir, temp entry, handle or listener. */
async function expectNoLeaks(): Promise<void> {
  const leaks = await quiesce(baseline);
  expect(leaks).toEqual({ fdDelta: 0, newFds: [], children: [], runDirs: [], tmpEntries: [], handles: {}, exitListeners: 0 });
  expect(readdirSync(dirs.run)).toEqual([]);
  expect(readdirSync(dirs.tmp)).toEqual([]);
}

describe("load", () => {
  it("serves 200 concurrent acquires on a pool of max 4 in arrival order, each VM used and released, nothing left after shutdown", async () => {
    const r = await concurrentAcquires(image, { n: 200, max: 4 });
    expect(r.order).toEqual(Array.from({ length: 200 }, (_, i) => i));
    expect(r.maxInUse).toBe(4);
    // max VMs, plus the one restore the pool keeps ahead (a spare).
    expect(r.maxLive).toBeLessThanOrEqual(5);
    // restoreOnRelease (the default): every release stops its VM and a fresh restore replaces it.
    expect(r.launched).toBeGreaterThanOrEqual(200);
    await expectNoLeaks();
  }, 300_000);

  it("starts and stops 100 VMs (restores, pools, cold boots) leaving no process, fd, socket, runtime dir or temp file", async () => {
    const r = await vmLoop(image, { n: 100 });
    expect(r.launched).toBeGreaterThanOrEqual(100);
    await expectNoLeaks();
  }, 300_000);

  it("runs 10 000 execs on one VM with host RSS, heap and fds flat", async () => {
    // In its own Node process (V8 flags fixed: see SOAK_NODE_FLAGS), with 2 000 execs first so
    // the JIT and V8's heap sizing are in their steady state.
    const r = await runExecSoak({ n: 10_000, warmup: 2_000, timeoutMs: 280_000 });
    expect(r.n).toBe(10_000);
    expect(r.fdDelta, JSON.stringify(r.newFds)).toBe(0);
    expect(r.heapGrowthMiB).toBeLessThan(1);
    expect(r.externalGrowthMiB).toBeLessThan(0.5);
    expect(r.rssGrowthMiB, JSON.stringify(r)).toBeLessThan(2);
  }, 300_000);
});
