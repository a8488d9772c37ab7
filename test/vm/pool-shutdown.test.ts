// pool.shutdown() ends what the pool is still starting (a spare being restored and warmed), not
// only what it holds: a guest that stops answering mid-start cannot keep shutdown, and so the
// program, waiting. Real VMs of the built-in busybox image; the guest is frozen with SIGSTOP.
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { Image } from "../../src/index.js";
import { isRunning, qemuPids } from "../helpers/vm.js";

/**
 * VMs this test process started: QEMU is our direct child (through setpriv's exec), and a VM's
 * machine is microvm (the engine's one-off probe of QEMU's sandbox runs `-M none`: not that).
 */
const ourQemus = () =>
  qemuPids().filter((p) => {
    try {
      const ppid = Number(readFileSync(`/proc/${p}/stat`, "utf8").split(") ")[1]!.split(" ")[1]);
      return ppid === process.pid && readFileSync(`/proc/${p}/cmdline`, "utf8").includes("microvm");
    } catch {
      return false;
    }
  });

describe("pool.shutdown", () => {
  it("kills a spare that is still starting, even when its guest does not answer", async () => {
    const image = await Image.build({ ref: "builtin:busybox" });
    const before = new Set(ourQemus());
    const pool = await image.pool({ min: 0, max: 1 }); // resolves at once; a spare starts in the background
    let frozen: number[] = [];
    for (let i = 0; i < 500 && frozen.length === 0; i++) {
      frozen = ourQemus().filter((p) => !before.has(p));
      for (const p of frozen) process.kill(p, "SIGSTOP");
      if (frozen.length === 0) await new Promise((r) => setTimeout(r, 2));
    }
    expect(frozen.length, "the spare's QEMU process").toBe(1);
    expect(pool.spareCount(), "the spare was caught while starting").toBe(0);
    const t0 = Date.now();
    await pool.shutdown();
    expect(Date.now() - t0).toBeLessThan(10_000);
    for (const p of frozen) expect(isRunning(p)).toBe(false);
  }, 60_000);
});
