// Self-healing of snapshots that are whole byte for byte but fail every restore: garbage device
// state, or a RAM file and a state file that do not belong together, each sealed again with
// correct checksums (what a cache writer or a broken disk could leave). A failed restore is
// counted in the snapshot's directory; the first is retried, the second in a row (in any
// process) quarantines the snapshot and bakes it again, and the pool serves from the new one.
// `supermachine verify --restore` test-boots every snapshot and `--fix` quarantines those QEMU refuses.
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { exportSnapshots, Image, loadPools } from "../../src/index.js";
import { signed, TRUST } from "../helpers/transfer.js";
import { homePaths } from "../../src/paths.js";
import { RESTORE_FAILURES_FILE, recordRestoreFailure, restoreFailures } from "../../src/store/restore-failures.js";
import { loadSnapshot, sealSnapshot, verifySnapshot } from "../../src/store/snapshots.js";
import { cli as runCli } from "../helpers/run.js";

const work = mkdtempSync(join(tmpdir(), "sm-restore-heal-test-"));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** Replaces files of the snapshot at `dir` by `edit`, then seals it again: every checksum matches. */
async function tamper(dir: string, edit: () => void): Promise<string> {
  const before = await loadSnapshot(dir);
  edit();
  const meta = await sealSnapshot(dir, before!.meta, "a test");
  expect((await verifySnapshot(dir)).ok).toBe(true);
  return meta.checksum;
}

function quarantined(snapshotsDir: string): { name: string; reason: string }[] {
  const q = join(snapshotsDir, ".quarantine");
  if (!existsSync(q)) return [];
  return readdirSync(q).map((name) => ({ name, reason: (JSON.parse(readFileSync(join(q, name, "QUARANTINED.json"), "utf8")) as { reason: string }).reason }));
}

describe("snapshots whose restore fails", () => {
  it("garbage state sealed as sound: fromSnapshot fails naming it (nothing moved); a built image's pool quarantines it on its second failure, rebakes and serves", async () => {
    const snapshotsDir = join(work, "garbage");
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
    await img.dropHandoff();
    const dir = img.snapshotPath;
    const state = join(dir, "state");
    const checksum = await tamper(dir, () => writeFileSync(state, randomBytes(readFileSync(state).length)));

    // A process that cannot rebake: both restores fail, the error says why, the snapshot stays.
    const opened = await Image.fromSnapshot(dir);
    const err = await opened.pool({ min: 0, max: 1, restoreTimeoutMs: 20_000 }).then((p) => p.acquire().finally(() => p.shutdown())).catch((e: unknown) => e);
    expect(err).toMatchObject({ name: "ImageError", code: "SNAPSHOT_DAMAGED" });
    expect((err as Error).message).toMatch(/is damaged: its restore failed 2 times in a row; the last time: restoring .*state failed: QEMU exited during boot \(code 1\)/);
    expect((err as { hint: string }).hint).toContain("Image.fromSnapshot");
    expect(await restoreFailures(dir, checksum)).toBe(2);
    expect(quarantined(snapshotsDir)).toEqual([]);

    // Another process (the record is on disk), which can: its first failure is one too many.
    const warnings: Error[] = [];
    const onWarning = (w: Error) => warnings.push(w);
    process.on("warning", onWarning);
    const built = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
    const pool = await built.pool({ min: 0, max: 2, restoreTimeoutMs: 20_000 });
    try {
      const vm = await pool.acquire();
      expect((await vm.exec({ argv: ["echo", "healed"] })).stdout.toString()).toBe("healed\n");
      await vm.release();
    } finally {
      await pool.shutdown();
      process.off("warning", onWarning);
    }
    expect(warnings.map((w) => (w as { code?: string }).code)).toEqual(["SUPERMACHINE_SNAPSHOT_DAMAGED"]);
    const q = quarantined(snapshotsDir);
    expect(q).toHaveLength(1);
    expect(q[0]!.reason).toMatch(/^restore failed 3 times in a row: restoring .*QEMU exited during boot/);
    // The failures went with it; the snapshot there now is a new one that restores.
    expect(readdirSync(join(snapshotsDir, ".quarantine", q[0]!.name))).toContain(RESTORE_FAILURES_FILE);
    const now = await verifySnapshot(dir);
    expect(now.ok && now.snapshot.meta.checksum).not.toBe(checksum);
    expect(existsSync(join(dir, RESTORE_FAILURES_FILE))).toBe(false);
  });

  it("one failure on record is forgiven by a restore that works", async () => {
    const snapshotsDir = join(work, "forgiven");
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "bb" });
    await img.dropHandoff();
    const snap = (await loadSnapshot(img.snapshotPath))!;
    expect(await recordRestoreFailure(snap.dir, snap.meta.checksum, "a test")).toBe(1);
    // A line counted against another snapshot that was there before does not count.
    expect(await restoreFailures(snap.dir, "0".repeat(64))).toBe(0);
    const pool = await img.pool({ min: 0, max: 1 });
    try {
      const vm = await pool.acquire();
      await vm.release();
    } finally {
      await pool.shutdown();
    }
    await expect.poll(() => existsSync(join(snap.dir, RESTORE_FAILURES_FILE))).toBe(false);
    expect(quarantined(snapshotsDir)).toEqual([]);
  });
});

describe("a cache entry whose restore fails", () => {
  it.each([
    ["loadPools({ cacheFrom })", {}],
    ["a lazy pool (a fleet node with --lazy --bake-on-demand)", { lazy: true, bakeOnDemand: true }],
  ] as const)("%s imports it, quarantines it at its second failure and bakes it here instead of importing it again", async (what, mode) => {
    // A trusted, signed entry whose device state is garbage: what a careless or compromised
    // writer of the trusted key leaves. Every check passes; only a restore can tell.
    const project = join(work, `project-${"lazy" in mode ? "lazy" : "eager"}`);
    mkdirSync(join(project, "images"), { recursive: true });
    writeFileSync(join(project, "images", "box.ts"), `import { defineImage } from "supermachine/config";\nexport default defineImage({ ref: "builtin:busybox", memoryMib: 208 });\n`);
    const config = (snapshots: string) =>
      writeFileSync(
        join(project, "supermachine.config.ts"),
        `import { defineConfig } from "supermachine/config";\nexport default defineConfig({ images: ["./images/*.ts"], snapshotsDir: ${JSON.stringify(snapshots)}, pools: { box: { image: "box", min: 0, max: 1, restoreTimeoutMs: 20000 } } });\n`,
      );
    config("./.writer");
    const writer = await loadPools({ cwd: project });
    await writer.close();
    const writerDir = join(project, ".writer");
    const [name] = readdirSync(writerDir).filter((n) => n.startsWith("box-"));
    const state = join(writerDir, name!, "state");
    await tamper(join(writerDir, name!), () => writeFileSync(state, randomBytes(readFileSync(state).length)));
    const cacheDir = join(work, `cache-${"lazy" in mode ? "lazy" : "eager"}`);
    await exportSnapshots(cacheDir, [{ dir: join(writerDir, name!) }], signed);

    config("./.reader");
    const events: string[] = [];
    const pools = await loadPools({ cwd: project, cacheFrom: cacheDir, cacheTrust: TRUST, ...mode, onEvent: (e) => void (e.type === "done" && events.push(`${e.name}:${e.node.status}`)) });
    expect(what).toBeTruthy();
    try {
      const vm = await pools.box!.acquire();
      expect((await vm.exec({ argv: ["echo", "baked here"] })).stdout.toString()).toBe("baked here\n");
      await vm.release();
    } finally {
      await pools.close();
    }
    // Imported once, then baked here (the rebuild does not fetch the cache's copy again).
    expect(events).toEqual(["box:imported", "box:baked"]);
    const readerDir = join(project, ".reader");
    expect(quarantined(readerDir).map((q) => q.reason)).toEqual([expect.stringMatching(/^restore failed 2 times in a row: restoring .*state failed/)]);
    // What serves now was baked here: its device state is not the cache's garbage.
    const now = (await loadSnapshot(join(readerDir, name!)))!;
    expect(readFileSync(now.state).equals(readFileSync(state))).toBe(false);
  });
});

describe("supermachine verify --restore", () => {
  it("test-boots each snapshot: a RAM and state pair that do not belong together is damaged (exit 1), --fix quarantines it, the sound one stays", async () => {
    // A home of its own, whose default snapshots directory holds a sound snapshot and a bad one.
    const home = join(work, "home");
    mkdirSync(home, { recursive: true });
    cpSync(homePaths().builtin, join(home, "builtin"), { recursive: true });
    const snapshotsDir = join(home, "snapshots");
    const good = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "good" });
    await good.dropHandoff();
    const other = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "other", env: { OTHER: "1" }, warmup: async (vm) => void (await vm.exec({ argv: ["sh", "-c", "dd if=/dev/urandom of=/tmp/f bs=1M count=2 2>/dev/null"] })) });
    await other.dropHandoff();
    await tamper(other.snapshotPath, () => cpSync(join(good.snapshotPath, "ram"), join(other.snapshotPath, "ram")));

    const env = { ...process.env, SUPERMACHINE_HOME: home };
    const cli = (...args: string[]) => runCli(args, { cwd: work, env, timeout: 300_000 });
    const plain = await cli("verify");
    expect(plain.status, plain.stderr).toBe(0); // every byte is as sealed

    const bad = await cli("verify", "--restore");
    expect(bad.status, bad.stderr).toBe(1);
    expect(bad.stdout).toContain(`damaged snapshot ${other.snapshotPath} (other): its restore fails: restoring ${join(other.snapshotPath, "state")} failed`);
    expect(bad.stdout).toMatch(/1 damaged \(supermachine verify --fix moves them aside\); 1 of 2 restored in a VM/);
    expect(existsSync(other.snapshotPath)).toBe(true);

    const fix = await cli("verify", "--restore", "--fix", "--json");
    expect(fix.status, fix.stdout).toBe(0);
    const report = JSON.parse(fix.stdout) as { damaged: number; fixed: number; snapshots: { path: string; status: string; restore?: { ok: boolean; ms?: number; code?: string } }[] };
    expect(report).toMatchObject({ damaged: 1, fixed: 1 });
    const byPath = new Map(report.snapshots.map((s) => [s.path, s]));
    expect(byPath.get(good.snapshotPath)).toMatchObject({ status: "ok", restore: { ok: true, ms: expect.any(Number) } });
    expect(byPath.get(other.snapshotPath)).toMatchObject({ status: "damaged", restore: { ok: false, code: "ENGINE_RESTORE_FAILED" } });
    expect(existsSync(other.snapshotPath)).toBe(false);
    expect(quarantined(snapshotsDir).map((q) => q.reason)).toEqual([expect.stringMatching(/^its restore fails: /)]);
    const again = await cli("verify", "--restore");
    expect(again.status, again.stdout).toBe(0);
    expect(again.stdout).toContain("1 of 1 restored in a VM");
  });
});
