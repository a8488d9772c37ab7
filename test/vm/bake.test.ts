// Bakes and the snapshot cache: a build with baked inputs boots nothing, a damaged snapshot is
// rebaked, two processes baking the same snapshot bake once, pools restore it.
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { cpuModel, passesHostCpu } from "../../src/engine/identity.js";
import type { Accel } from "../../src/engine/accel.js";
import { engineCounters } from "../../src/engine/qemu.js";
import { Image } from "../../src/index.js";
import { isRunning, waitFor } from "../helpers/vm.js";

const root = join(import.meta.dirname, "..", "..");
const snapshotsDir = mkdtempSync(join(tmpdir(), "sm-bake-test-"));
afterAll(() => rmSync(snapshotsDir, { recursive: true, force: true }));

describe("baking", () => {
  it("bakes once; a build with the same inputs boots nothing", async () => {
    const before = engineCounters().launched;
    const progress: string[] = [];
    const a = await Image.build({
      ref: "builtin:busybox",
      snapshotsDir,
      name: "bb",
      onProgress: (p) => progress.push(p.phase === "bake" ? `bake:${p.step}` : p.phase),
    });
    expect(engineCounters().launched).toBe(before + 1);
    expect(a.snapshotPath).toBe(join(snapshotsDir, "bb"));
    expect(progress.filter((p) => p.startsWith("bake"))).toEqual(["bake:boot", "bake:capture", "bake:handoff", "bake-done"]);
    // The key records what the engine reported of itself, the accelerator the bake VM ran under
    // included; the bake log tells what happened.
    const meta = JSON.parse(readFileSync(join(a.snapshotPath, "meta.json"), "utf8")) as { inputs: { engine: Record<string, string> } };
    const pool = await a.pool({ min: 1, max: 1 });
    try {
      expect(meta.inputs.engine.accel).toBe((await pool.acquire()).accel);
    } finally {
      await pool.shutdown();
    }
    // The host's CPU flags only where the guest sees them (KVM passing the host's CPU through).
    const e = meta.inputs.engine;
    expect(Object.keys(e).sort()).toEqual(["accel", "agentKey", "agentVersion", "cpu", ...(passesHostCpu(e.accel as Accel, e.cpu!) ? ["cpuFlags"] : []), "kernelKey", "machine", "qemu"]);
    expect(e).toMatchObject({ machine: "microvm", cpu: cpuModel(e.accel as Accel) });
    expect(readFileSync(join(a.snapshotPath, "bake.log"), "utf8")).toMatch(/booted in \d+ ms \(accel (tcg|kvm)/);
    const launched = engineCounters().launched;
    const cached: string[] = [];
    const b = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb", onProgress: (p) => cached.push(p.phase) });
    expect(engineCounters().launched).toBe(launched);
    expect(cached).toContain("bake-cached");
    expect(b.inputHash).toBe(a.inputHash);
    // Another input (memory) is another snapshot.
    const c = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb-512", memoryMib: 512 });
    expect(c.inputHash).not.toBe(a.inputHash);
    expect(c.memoryMib).toBe(512);
  });

  it("hands the baked VM to the image's first pool (warm handoff)", async () => {
    const before = engineCounters().launched;
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "handoff", memoryMib: 160 });
    expect(engineCounters().launched).toBe(before + 1); // the bake
    const pool = await img.pool({ min: 1, max: 1 });
    try {
      // One more process only: the spare restore; the idle VM is the baked one.
      expect(await waitFor(() => pool.spareCount() === 1, 10_000)).toBe(true);
      expect(engineCounters().launched).toBe(before + 2);
      const vm = await pool.acquire();
      expect((await vm.exec({ argv: ["echo", "handed off"] })).stdout.toString()).toBe("handed off\n");
      const guest = Number((await vm.exec({ argv: ["date", "+%s"] })).stdout.toString());
      expect(Math.abs(guest - Date.now() / 1000)).toBeLessThan(2);
    } finally {
      await pool.shutdown();
    }
    // The snapshot itself is intact: a clone restores it.
    const clonePool = await (await Image.fromSnapshot(img.snapshotPath)).pool({ min: 1, max: 1 });
    try {
      const clone = await clonePool.acquire();
      expect((await clone.exec({ argv: ["echo", "clone"] })).stdout.toString()).toBe("clone\n");
    } finally {
      await clonePool.shutdown();
    }
  });

  it("gives the first pool of a fresh bake min VMs, the handed-off one among them, not one more", async () => {
    const before = engineCounters().launched;
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "handoff-min2", memoryMib: 176 });
    const pool = await img.pool({ min: 2, max: 4 });
    try {
      expect(await waitFor(() => pool.spareCount() === 1, 10_000)).toBe(true);
      await new Promise((r) => setTimeout(r, 500)); // a boot nobody waits for would have started by now
      expect(pool.stats()).toMatchObject({ alive: 2, idle: 2 });
      // The bake, one restore for min (the baked VM is the other), and the spare.
      expect(engineCounters().launched).toBe(before + 3);
    } finally {
      await pool.shutdown();
    }
  });

  it("detects a damaged snapshot and bakes it again", async () => {
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
    const state = join(img.snapshotPath, "state");
    const bytes = readFileSync(state);
    const mid = bytes.length >> 1;
    bytes[mid] = bytes[mid]! ^ 0xff;
    writeFileSync(state, bytes);
    await expect(Image.fromSnapshot(img.snapshotPath)).rejects.toMatchObject({ code: "SNAPSHOT_DAMAGED" });
    const before = engineCounters().launched;
    const again = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
    expect(engineCounters().launched).toBe(before + 1);
    const pool = await again.pool({ min: 1, max: 1 });
    try {
      const vm = await pool.acquire();
      expect((await vm.exec({ argv: ["echo", "rebaked"] })).stdout.toString()).toBe("rebaked\n");
    } finally {
      await pool.shutdown();
    }
  });

  it("opens a snapshot directory with Image.fromSnapshot", async () => {
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
    const same = await Image.fromSnapshot(img.snapshotPath);
    expect(same).toMatchObject({ digest: img.digest, memoryMib: 256, vcpus: 1, snapshotPath: img.snapshotPath });
    await expect(Image.fromSnapshot(join(snapshotsDir, "nope"))).rejects.toMatchObject({ code: "SNAPSHOT_NOT_FOUND" });
  });

  it("bakes once when two processes build the same snapshot at the same time", async () => {
    const dir = join(snapshotsDir, "concurrent");
    const script = `
      import { Image } from "supermachine";
      const img = await Image.build({ ref: "builtin:busybox", snapshotsDir: ${JSON.stringify(dir)}, name: "one", memoryMib: 192 });
      const { readFileSync } = await import("node:fs");
      console.log(JSON.parse(readFileSync(img.snapshotPath + "/meta.json", "utf8")).created);
    `;
    const run = () =>
      new Promise<string>((resolve, reject) => {
        const child = spawn(process.execPath, ["--input-type=module", "-e", script], { cwd: root, stdio: ["ignore", "pipe", "inherit"] });
        let out = "";
        child.stdout.on("data", (d: Buffer) => (out += d.toString()));
        child.on("exit", (code) => (code === 0 ? resolve(out.trim()) : reject(new Error(`exit ${code}`))));
      });
    const [a, b] = await Promise.all([run(), run()]);
    expect(a).toMatch(/^\d{4}-/);
    expect(b).toBe(a);
  });
});

describe("pools on snapshots", () => {
  it("restores the snapshot for every VM and keeps a process pre-started", async () => {
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
    // Baked VMs that no pool claimed (warm handoff) stay up for a while; they are not this pool's.
    const liveBefore = engineCounters().live;
    const pool = await img.pool({ min: 1, max: 3 });
    try {
      const vms = await Promise.all([pool.acquire(), pool.acquire(), pool.acquire()]);
      const outs = await Promise.all(vms.map((v) => v.exec({ argv: ["cat", "/proc/uptime"] })));
      // Restored VMs all continue from the snapshot's uptime, not from a fresh boot at 0.
      for (const o of outs) expect(Number(o.stdout.toString().split(" ")[0])).toBeGreaterThan(0);
      expect(pool.stats()).toMatchObject({ alive: 3, inUse: 3, idle: 0, waiting: 0 });
      await Promise.all(vms.map((v) => v.release()));
    } finally {
      await pool.shutdown();
    }
    expect(engineCounters().live).toBe(liveBefore);
  });

  it("evicts idle VMs above min after idleTimeoutMs", async () => {
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
    const pool = await img.pool({ min: 0, max: 2, idleTimeoutMs: 300, restoreOnRelease: false });
    try {
      const [a, b] = await Promise.all([pool.acquire(), pool.acquire()]);
      await Promise.all([a.release(), b.release()]);
      expect(pool.stats().idle).toBe(2);
      expect(await waitFor(() => pool.stats().idle === 0, 5_000)).toBe(true);
      expect(await waitFor(() => !isRunning(a.pid) && !isRunning(b.pid), 3_000)).toBe(true);
    } finally {
      await pool.shutdown();
    }
  });

  it("replaces an idle VM whose QEMU process was killed, and keeps serving", async () => {
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
    const pool = await img.pool({ min: 1, max: 1, restoreOnRelease: false });
    try {
      const first = await pool.acquire();
      const pid = first.pid;
      await first.release();
      process.kill(pid, "SIGKILL");
      expect(await waitFor(() => !isRunning(pid), 3_000)).toBe(true);
      const next = await pool.acquire();
      expect(next.pid).not.toBe(pid);
      expect((await next.exec({ argv: ["echo", "alive"] })).stdout.toString()).toBe("alive\n");
    } finally {
      await pool.shutdown();
    }
  });
});

describe("vm.snapshot", () => {
  it("captures a running VM into a new image; the VM goes on", async () => {
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
    const pool = await img.pool({ min: 1, max: 1 });
    const dest = join(snapshotsDir, "captured");
    try {
      const vm = await pool.acquire();
      await vm.exec({ argv: ["sh", "-c", "echo captured-state > /root/note; (sleep 1000 &) ; true"] });
      const captured = await vm.snapshot(dest);
      expect(captured.snapshotPath).toBe(dest);
      expect(captured.digest).toBe(img.digest);
      // The original VM continues.
      expect((await vm.exec({ argv: ["cat", "/root/note"] })).stdout.toString()).toBe("captured-state\n");
      const again = await Image.fromSnapshot(dest);
      const p2 = await again.pool({ min: 1, max: 1 });
      try {
        const clone = await p2.acquire();
        expect((await clone.exec({ argv: ["cat", "/root/note"] })).stdout.toString()).toBe("captured-state\n");
        expect((await clone.exec({ argv: ["sh", "-c", "pidof sleep >/dev/null && echo running"] })).stdout.toString()).toBe("running\n");
      } finally {
        await p2.shutdown();
      }
    } finally {
      await pool.shutdown();
    }
  });
});
