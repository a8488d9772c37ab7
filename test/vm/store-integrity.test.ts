// Store integrity on real VMs: a snapshot whose RAM, device state or metadata is damaged (even
// at the same size, its mtime put back) is detected, moved into the quarantine, never booted
// again and rebaked (a pool: transparently; a frozen build: a clear error; fromSnapshot: an
// error, nothing moved); `supermachine verify` finds damaged snapshots, root filesystems and
// blobs, and `--fix` quarantines them.
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { cpSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, rmSync, statSync, writeFileSync, writeSync, closeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { buildGraph } from "../../src/project/build.js";
import { engineCounters } from "../../src/engine/qemu.js";
import { buildImageGraph } from "../../src/graph/graph.js";
import { Image, loadPools, type BuildProgress } from "../../src/index.js";
import { homePaths } from "../../src/paths.js";
import { verifySnapshot } from "../../src/store/snapshots.js";
import { cli as runCli } from "../helpers/run.js";

const work = mkdtempSync(join(tmpdir(), "sm-integrity-test-"));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** Overwrites every non-zero 16 KiB chunk's first 4 KiB with random bytes (a restore of it fails). */
function scrambleRam(ram: string, opts: { keepMtime: boolean }): void {
  const before = statSync(ram, { bigint: true }).mtimeNs;
  const fd = openSync(ram, "r+");
  try {
    const buf = Buffer.alloc(16384);
    const zero = Buffer.alloc(16384);
    const size = statSync(ram).size;
    for (let off = 0; off < size; off += 16384) {
      readSync(fd, buf, 0, 16384, off);
      if (!buf.equals(zero)) writeSync(fd, randomBytes(4096), 0, 4096, off);
    }
  } finally {
    closeSync(fd);
  }
  if (opts.keepMtime) setMtimeNs(ram, before);
}

/** Puts back an mtime to the nanosecond (what bit rot or a careful editor leaves: nothing to notice). */
function setMtimeNs(path: string, ns: bigint): void {
  execFileSync("touch", ["-m", "-d", `@${ns / 1_000_000_000n}.${String(ns % 1_000_000_000n).padStart(9, "0")}`, path]);
  expect(statSync(path, { bigint: true }).mtimeNs).toBe(ns);
}

function quarantined(snapshotsDir: string): { name: string; reason: string }[] {
  const q = join(snapshotsDir, ".quarantine");
  if (!existsSync(q)) return [];
  return readdirSync(q).map((name) => ({ name, reason: (JSON.parse(readFileSync(join(q, name, "QUARANTINED.json"), "utf8")) as { reason: string }).reason }));
}

describe("damaged snapshots", () => {
  it("a RAM file damaged at the same size and mtime: a restore fails, the pool verifies it, quarantines it, rebakes and serves", async () => {
    const snapshotsDir = join(work, "pool");
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
    const first = JSON.parse(readFileSync(join(img.snapshotPath, "meta.json"), "utf8")) as { created: string };
    scrambleRam(join(img.snapshotPath, "ram"), { keepMtime: true });

    // Nothing on disk says it changed: a build trusts it (no boot) ...
    const launched = engineCounters().launched;
    const cached = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
    expect(engineCounters().launched).toBe(launched);
    // ... until a restore from it fails: then its RAM is checked against its checksums.
    const warnings: Error[] = [];
    const onWarning = (w: Error) => warnings.push(w);
    process.on("warning", onWarning);
    const t0 = performance.now();
    const pool = await cached.pool({ min: 1, max: 2, restoreTimeoutMs: 20_000 });
    try {
      const vm = await pool.acquire();
      expect((await vm.exec({ argv: ["echo", "served"] })).stdout.toString()).toBe("served\n");
      await vm.release();
      const vm2 = await pool.acquire(); // restores from the rebaked snapshot
      expect((await vm2.exec({ argv: ["echo", "again"] })).stdout.toString()).toBe("again\n");
    } finally {
      await pool.shutdown();
      process.off("warning", onWarning);
    }
    expect(performance.now() - t0).toBeLessThan(90_000);
    expect(warnings.map((w) => (w as { code?: string }).code)).toEqual(["SUPERMACHINE_SNAPSHOT_DAMAGED"]);
    const q = quarantined(snapshotsDir);
    expect(q).toHaveLength(1);
    expect(q[0]!.name).toMatch(/^bb-/);
    expect(q[0]!.reason).toMatch(/^its RAM differs from its checksums at chunk \d+/);
    expect(warnings[0]!.message).toContain(join(snapshotsDir, ".quarantine", q[0]!.name));
    // The snapshot there now is a new, sound one; the next build uses it.
    const now = await verifySnapshot(img.snapshotPath);
    expect(now.ok).toBe(true);
    expect(now.ok && now.snapshot.meta.created).not.toBe(first.created);
    const events: string[] = [];
    await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb", onProgress: (p) => events.push(p.phase) });
    expect(events).toContain("bake-cached");
  });

  it("a RAM file written since its capture is verified when loaded: the build quarantines it and rebakes, and says why", async () => {
    const snapshotsDir = join(work, "written");
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
    // One byte of one chunk, which would not even stop a restore.
    const ram = join(img.snapshotPath, "ram");
    const fd = openSync(ram, "r+");
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, 8 * 2 ** 20 + 123);
    b[0] = b[0]! ^ 0x01;
    writeSync(fd, b, 0, 1, 8 * 2 ** 20 + 123);
    closeSync(fd);
    const events: BuildProgress[] = [];
    const launched = engineCounters().launched;
    const again = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb", onProgress: (p) => events.push(p) });
    expect(engineCounters().launched).toBe(launched + 1); // the rebake, and nothing restored from the damaged one
    const damaged = events.find((e) => e.phase === "bake-damaged");
    expect(damaged).toMatchObject({ phase: "bake-damaged", snapshot: img.snapshotPath, reason: expect.stringContaining("the file was modified after the capture") });
    expect(damaged && "reason" in damaged && damaged.reason).toMatch(/chunk 512 \(offset 8388608/);
    expect(events.map((e) => e.phase)).toContain("bake-done");
    expect(quarantined(snapshotsDir)).toHaveLength(1);
    expect((await verifySnapshot(again.snapshotPath)).ok).toBe(true);
    await again.dropHandoff();
  });

  it("damaged metadata and device state are detected and rebaked; a frozen build names the damage", async () => {
    const snapshotsDir = join(work, "meta-state");
    const graph = buildImageGraph([{ name: "bb", module: null, from: null, definition: { ref: "builtin:busybox" } }]);
    const build = (frozen = false) => buildGraph(graph, { snapshotsDir, handoff: false, ...(frozen ? { frozen: true } : {}) });
    const baked = (await build()).get("bb")!;
    expect(baked.status).toBe("baked");
    const dir = baked.dir;
    // meta.json edited into other valid JSON: its checksum no longer matches.
    const meta = JSON.parse(readFileSync(join(dir, "meta.json"), "utf8")) as { bakeMs: number; workloadRunning: boolean };
    writeFileSync(join(dir, "meta.json"), JSON.stringify({ ...meta, workloadRunning: !meta.workloadRunning }, null, 2));
    const err = await build(true).catch((e: unknown) => e);
    expect(err).toMatchObject({ name: "BuildError", code: "BUILD_FROZEN_DAMAGED" });
    expect((err as Error).message).toMatch(/bb \(key [0-9a-f]{16}; its snapshot was damaged: its meta\.json does not match its checksum .*, and was moved to .*\.quarantine\/bb-/);
    expect((err as { hint: string }).hint).toContain("does not rebake");
    expect(existsSync(dir)).toBe(false);
    expect((await build()).get("bb")!.status).toBe("baked");
    // The device state, one bit.
    const state = readFileSync(join(dir, "state"));
    state[state.length >> 1]! ^= 0x10;
    writeFileSync(join(dir, "state"), state);
    const events: string[] = [];
    const nodes = await buildGraph(graph, { snapshotsDir, handoff: false, onEvent: (e) => e.type === "progress" && events.push(e.progress.phase) });
    expect(nodes.get("bb")!.status).toBe("baked");
    expect(events).toContain("bake-damaged");
    const reasons = quarantined(snapshotsDir).map((q) => q.reason).sort();
    expect(reasons).toHaveLength(2);
    expect(reasons[0]).toContain("its device-state file does not match its checksum");
    expect(reasons[1]).toContain("its meta.json does not match its checksum");
  });

  it("Image.fromSnapshot on a damaged snapshot: the failed restore names the damage, and nothing is moved", async () => {
    const snapshotsDir = join(work, "from");
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
    await img.dropHandoff();
    scrambleRam(join(img.snapshotPath, "ram"), { keepMtime: true });
    const opened = await Image.fromSnapshot(img.snapshotPath);
    const err = await opened.pool({ min: 1, max: 1, restoreTimeoutMs: 20_000 }).catch((e: unknown) => e);
    expect(err).toMatchObject({ name: "ImageError", code: "SNAPSHOT_DAMAGED", message: expect.stringContaining(`snapshot ${img.snapshotPath} is damaged: its RAM differs`) });
    expect((err as { hint: string }).hint).toContain("Image.fromSnapshot");
    expect(existsSync(join(img.snapshotPath, "meta.json"))).toBe(true);
    expect(quarantined(snapshotsDir)).toEqual([]);
  });

  it("loadPools: frozen fails clearly on a snapshot found damaged by a failed restore; unfrozen rebakes it and serves", async () => {
    const project = join(work, "project");
    mkdirSync(join(project, "images"), { recursive: true });
    writeFileSync(
      join(project, "supermachine.config.ts"),
      `import { defineConfig } from "supermachine/config";\nexport default defineConfig({ images: ["./images/*.ts"], snapshotsDir: "./.snapshots", pools: { box: { image: "box", min: 1, max: 1, restoreTimeoutMs: 20000 } } });\n`,
    );
    writeFileSync(join(project, "images", "box.ts"), `import { defineImage } from "supermachine/config";\nexport default defineImage({ ref: "builtin:busybox", memoryMib: 224 });\n`);
    const pools = await loadPools({ cwd: project });
    await pools.close();
    const snapshotsDir = join(project, ".snapshots");
    const [name] = readdirSync(snapshotsDir).filter((n) => n.startsWith("box-"));
    scrambleRam(join(snapshotsDir, name!, "ram"), { keepMtime: true });
    const err = await loadPools({ cwd: project, frozen: true }).catch((e: unknown) => e);
    expect(err).toMatchObject({ name: "BuildError", code: "BUILD_FROZEN_DAMAGED", message: expect.stringContaining(`snapshot ${join(snapshotsDir, name!)} is damaged (its RAM differs from its checksums`) });
    expect((err as Error).message).toContain("a frozen build does not rebake it");
    expect(quarantined(snapshotsDir)).toHaveLength(1);
    const again = await loadPools({ cwd: project });
    try {
      const vm = await again.box!.acquire();
      expect((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString()).toBe("ok\n");
      await vm.release();
    } finally {
      await again.close();
    }
  });
});

describe("supermachine verify", () => {
  it("finds a damaged snapshot, root filesystem and blob (exit 1), --fix quarantines them, and the next build rebuilds what it needs", async () => {
    // A home of its own: its images and blobs are damaged on purpose.
    const home = join(work, "home");
    mkdirSync(home, { recursive: true });
    cpSync(homePaths().builtin, join(home, "builtin"), { recursive: true });
    const env = { ...process.env, SUPERMACHINE_HOME: home };
    const cli = (...args: string[]) => runCli(args, { cwd: work, env, timeout: 300_000 });
    // A snapshot (and its image's root filesystem) and, through `tag`, blobs in the blob store.
    const run = await cli("run", "--json", "builtin:busybox", "--", "echo", "hi");
    expect(run.status, run.stderr).toBe(0);
    const tag = await cli("tag", "builtin:busybox", "localhost/verify-test:1");
    expect(tag.status, tag.stderr).toBe(0);
    const clean = await cli("verify", "--json");
    expect(clean.status, clean.stderr).toBe(0);
    const report = JSON.parse(clean.stdout) as { snapshots: { path: string; status: string }[]; images: { path: string; status: string }[]; blobs: { checked: number }; damaged: number };
    expect(report.damaged).toBe(0);
    expect(report.snapshots.length).toBeGreaterThanOrEqual(1);
    expect(report.snapshots.every((s) => s.status === "ok")).toBe(true);
    expect(report.images).toHaveLength(1);
    expect(report.images[0]!.status).toBe("ok");
    expect(report.blobs.checked).toBeGreaterThanOrEqual(3);

    const snap = report.snapshots[0]!.path;
    scrambleRam(join(snap, "ram"), { keepMtime: true });
    const rootfs = join(report.images[0]!.path, "rootfs.sqfs");
    const rootfsMtime = statSync(rootfs, { bigint: true }).mtimeNs;
    const fd = openSync(rootfs, "r+");
    writeSync(fd, Buffer.from("garbage"), 0, 7, 4096);
    closeSync(fd);
    setMtimeNs(rootfs, rootfsMtime);
    const blobsDir = join(home, "store", "blobs", "sha256");
    const blob = readdirSync(blobsDir).map((n) => join(blobsDir, n)).sort((a, b) => statSync(b).size - statSync(a).size)[0]!; // the layer
    const bytes = readFileSync(blob);
    bytes[bytes.length >> 1]! ^= 0xff;
    writeFileSync(blob, bytes);

    const bad = await cli("verify");
    expect(bad.status).toBe(1);
    expect(bad.stdout).toContain(`damaged snapshot ${snap}`);
    expect(bad.stdout).toContain(`damaged image ${report.images[0]!.path}`);
    expect(bad.stdout).toContain(`damaged blob ${blob}: its content hashes to sha256:`);
    expect(bad.stdout).toMatch(/: 3 damaged \(supermachine verify --fix moves them aside\)/);
    const fix = await cli("verify", "--fix", "--json");
    expect(fix.status, fix.stdout).toBe(0);
    const fixed = JSON.parse(fix.stdout) as { damaged: number; fixed: number };
    expect(fixed).toMatchObject({ damaged: 3, fixed: 3 });
    expect(existsSync(snap)).toBe(false);
    expect(existsSync(blob)).toBe(false);
    expect(readdirSync(join(home, "images", ".quarantine"))).toHaveLength(1);
    expect(readdirSync(join(home, "store", ".quarantine")).filter((n) => !n.endsWith(".json"))).toHaveLength(1);
    expect((await cli("verify")).status).toBe(0);
    // The next run rebuilds the root filesystem and rebakes the snapshot.
    const rerun = await cli("run", "builtin:busybox", "--", "echo", "rebuilt");
    expect(rerun.status, rerun.stderr).toBe(0);
    expect(rerun.stdout).toBe("rebuilt\n");
    const after = JSON.parse((await cli("verify", "--json")).stdout) as { damaged: number; images: { status: string }[] };
    expect(after.damaged).toBe(0);
    expect(after.images.map((i) => i.status)).toEqual(["ok"]);
  });
});
