// Snapshot gc's rules without VMs: snapshots are fake directories with a meta.json of the current
// format (all the store reads to classify one). What is not a snapshot, temps of a bake in
// progress and leased snapshots are never removed; Image.build's snapshots only with `all`; a
// root filesystem a remaining snapshot was made on is kept; the project registry drops configs
// that are gone and gc's own loads do not count as a use.
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { duration } from "../../src/cli/images.js";
import { projectsDir, registeredProjects, registerProject, withoutRegistration } from "../../src/config/registry.js";
import { collectGarbage } from "../../src/image/gc.js";
import { holdSnapshot } from "../../src/store/leases.js";
import { collectSnapshots, isProjectSnapshot } from "../../src/store/snapshot-gc.js";
import { META_VERSION, type SnapshotMeta } from "../../src/store/snapshots.js";

const work = mkdtempSync(join(tmpdir(), "sm-gc-unit-"));
afterAll(() => rmSync(work, { recursive: true, force: true }));
let n = 0;
const fresh = (name: string) => {
  const d = join(work, `${name}-${n++}`);
  mkdirSync(d, { recursive: true });
  return d;
};

const key = (c: string) => c.repeat(64);

/** A fake snapshot: meta.json only. `module` null makes it an Image.build snapshot. */
function fakeSnapshot(dir: string, dirName: string, o: { name: string; hash: string; module?: string | null; created?: string; rootfs?: string }): string {
  const path = join(dir, dirName);
  mkdirSync(path, { recursive: true });
  const meta: Partial<SnapshotMeta> = {
    version: META_VERSION,
    hash: o.hash,
    sources: { name: o.name, ref: "builtin:busybox", module: o.module === undefined ? `images/${o.name}.ts` : o.module, files: {} },
    image: { ref: "builtin:busybox", digest: "sha256:x", config: {} as SnapshotMeta["image"]["config"], rootfs: o.rootfs ?? "/nowhere", rootfsSize: 1 },
    created: o.created ?? new Date().toISOString(),
  };
  writeFileSync(join(path, "meta.json"), JSON.stringify(meta));
  writeFileSync(join(path, "ram"), Buffer.alloc(8192, 1));
  return path;
}

describe("snapshot gc rules", () => {
  it("tells project snapshots from others by name, key and module", () => {
    const meta = (name: string, hash: string, module: string | null) => ({ hash, sources: { name, ref: "r", module, files: {} } }) as SnapshotMeta;
    expect(isProjectSnapshot(`web-${key("a").slice(0, 16)}`, meta("web", key("a"), "images/web.ts"))).toBe(true);
    expect(isProjectSnapshot(`img-${key("a").slice(0, 16)}`, meta("image", key("a"), null))).toBe(false);
    expect(isProjectSnapshot("configured-vm", meta("web", "capture-0123", "images/web.ts"))).toBe(false);
    expect(isProjectSnapshot(`web-${key("b").slice(0, 16)}`, meta("web", key("a"), "images/web.ts"))).toBe(false);
  });

  it("removes unreferenced project snapshots only; leaves leased ones, temps, foreign directories and Image.build's", async () => {
    const dir = fresh("snaps");
    const current = fakeSnapshot(dir, `web-${key("a").slice(0, 16)}`, { name: "web", hash: key("a") });
    const old = fakeSnapshot(dir, `web-${key("b").slice(0, 16)}`, { name: "web", hash: key("b") });
    const leased = fakeSnapshot(dir, `api-${key("c").slice(0, 16)}`, { name: "api", hash: key("c") });
    const api = fakeSnapshot(dir, `img-${key("d").slice(0, 16)}`, { name: "image", hash: key("d"), module: null });
    const temp = fakeSnapshot(dir, `web-${key("e").slice(0, 16)}.tmp-0a1b2c`, { name: "web", hash: key("e") });
    mkdirSync(join(dir, "notes"));
    writeFileSync(join(dir, "notes", "meta.json"), '{"hello": 1}');
    writeFileSync(join(dir, "README"), "mine");
    const stale = fakeSnapshot(dir, `web-${key("f").slice(0, 16)}`, { name: "web", hash: key("f"), module: "images/web.ts" });
    writeFileSync(join(stale, "meta.json"), JSON.stringify({ ...JSON.parse(readFileSync(join(stale, "meta.json"), "utf8")), version: META_VERSION - 1 }));
    const release = holdSnapshot(leased);
    const isReferenced = (e: { key: string }) => e.key === key("a");
    try {
      const dry = await collectSnapshots({ dirs: [dir, dir], isReferenced, dryRun: true });
      expect(dry.removed.map((s) => s.dir)).toEqual([old]);
      expect(dry.removed[0]!.bytes).toBeGreaterThan(0);
      expect(existsSync(old)).toBe(true);
      const kept = Object.fromEntries(dry.kept.map((k) => [k.dir, k.reason]));
      expect(kept).toEqual({ [current]: "referenced", [leased]: "in-use", [api]: "not-a-project-snapshot" });

      const real = await collectSnapshots({ dirs: [dir], isReferenced });
      expect(real.removed.map((s) => s.dir)).toEqual([old]);
      expect(real.bytesFreed).toBe(real.removed[0]!.bytes);
      expect(existsSync(old)).toBe(false);
      // Nothing left behind: no temp, no lock.
      expect(readdirSync(dir).filter((e) => e.startsWith(`web-${key("b").slice(0, 16)}`))).toEqual([]);

      const all = await collectSnapshots({ dirs: [dir], isReferenced, all: true });
      expect(all.removed.map((s) => s.dir)).toEqual([api]);
    } finally {
      release();
    }
    for (const p of [current, leased, temp, stale, join(dir, "notes"), join(dir, "README")]) expect(existsSync(p), p).toBe(true);
    // The lease gone, the leased snapshot can go.
    const after = await collectSnapshots({ dirs: [dir], isReferenced });
    expect(after.removed.map((s) => s.dir)).toEqual([leased]);
  });

  it("keeps every project snapshot when no project says what is referenced", async () => {
    const dir = fresh("noproject");
    const a = fakeSnapshot(dir, `web-${key("a").slice(0, 16)}`, { name: "web", hash: key("a") });
    const r = await collectSnapshots({ dirs: [dir] });
    expect(r.removed).toEqual([]);
    expect(r.kept).toMatchObject([{ dir: a, reason: "no-project" }]);
  });

  it("removes only snapshots created before the cutoff", async () => {
    const dir = fresh("older");
    const old = fakeSnapshot(dir, `web-${key("a").slice(0, 16)}`, { name: "web", hash: key("a"), created: new Date(Date.now() - 8 * 86_400_000).toISOString() });
    const recent = fakeSnapshot(dir, `web-${key("b").slice(0, 16)}`, { name: "web", hash: key("b") });
    const r = await collectSnapshots({ dirs: [dir], isReferenced: () => false, createdBefore: Date.now() - duration("7d"), dryRun: true });
    expect(r.removed.map((s) => s.dir)).toEqual([old]);
    expect(r.kept).toMatchObject([{ dir: recent, reason: "recent" }]);
  });

  it("parses durations", () => {
    expect(duration("90s")).toBe(90_000);
    expect(duration("12h")).toBe(12 * 3_600_000);
    expect(duration("1.5d")).toBe(1.5 * 86_400_000);
    expect(duration("2w")).toBe(14 * 86_400_000);
    expect(() => duration("7")).toThrow(/expected a duration/);
    expect(() => duration("-1d")).toThrow(/expected a duration/);
  });
});

describe("root filesystems and snapshots", () => {
  it("keeps a root filesystem while a snapshot made on it remains", async () => {
    const home = fresh("home");
    const hex = "c".repeat(64);
    const entry = join(home, "images", hex);
    mkdirSync(entry, { recursive: true });
    writeFileSync(join(entry, "rootfs.sqfs"), Buffer.alloc(4096));
    // Built from a layout that is gone, long ago: nothing but the snapshot keeps it.
    writeFileSync(join(entry, "image.json"), JSON.stringify({ ref: `oci:${join(home, "gone")}:v1`, created: new Date(Date.now() - 86_400_000).toISOString() }));
    const snaps = fresh("elsewhere");
    const snap = fakeSnapshot(snaps, `web-${key("a").slice(0, 16)}`, { name: "web", hash: key("a"), rootfs: join(entry, "rootfs.sqfs") });

    expect(await collectGarbage(home, 0, { snapshotDirs: [snaps] })).toMatchObject({ imagesRemoved: 0 });
    // Not told where the snapshot is, or told to disregard it (a dry run removing it): collected.
    expect(await collectGarbage(home, 0, { snapshotDirs: [snaps], ignoreSnapshots: new Set([snap]), dryRun: true })).toMatchObject({ imagesRemoved: 1, bytesFreed: 4096 });
    expect(existsSync(entry)).toBe(true);
    expect(await collectGarbage(home, 0)).toMatchObject({ imagesRemoved: 1 });
    expect(existsSync(entry)).toBe(false);
  });

  it("looks in $SUPERMACHINE_HOME/snapshots without being told", async () => {
    const home = fresh("home");
    const hex = "d".repeat(64);
    const entry = join(home, "images", hex);
    mkdirSync(entry, { recursive: true });
    writeFileSync(join(entry, "rootfs.sqfs"), Buffer.alloc(10));
    writeFileSync(join(entry, "image.json"), JSON.stringify({ ref: "oci:/gone:v1", created: "2020-01-01T00:00:00Z" }));
    fakeSnapshot(join(home, "snapshots"), "img-0123456789abcdef", { name: "image", hash: key("e"), module: null, rootfs: join(entry, "rootfs.sqfs") });
    expect(await collectGarbage(home, 0)).toMatchObject({ imagesRemoved: 0 });
  });
});

describe("project registry", () => {
  it("records each project, drops those whose config is gone, and ignores gc's own loads", async () => {
    const home = fresh("home");
    const a = join(fresh("a"), "supermachine.config.ts");
    const b = join(fresh("b"), "supermachine.config.ts");
    writeFileSync(a, "");
    writeFileSync(b, "");
    registerProject(a, null, home);
    registerProject(b, "/somewhere/.snapshots", home);
    const byConfig = (x: { config: string }, y: { config: string }) => x.config.localeCompare(y.config);
    expect((await registeredProjects(home)).sort(byConfig).map((r) => [r.config, r.snapshotsDir])).toEqual(
      [
        { config: a, snapshotsDir: null },
        { config: b, snapshotsDir: "/somewhere/.snapshots" },
      ]
        .sort(byConfig)
        .map((r) => [r.config, r.snapshotsDir]),
    );
    expect(readdirSync(projectsDir(home))).toHaveLength(2);
    expect(readdirSync(projectsDir(home)).every((f) => /^[0-9a-f]{64}\.json$/.test(f))).toBe(true);

    // A fresh record is not rewritten; one a minute old is.
    const file = join(projectsDir(home), readdirSync(projectsDir(home)).find((f) => readFileSync(join(projectsDir(home), f), "utf8").includes(a))!);
    const old = new Date(Date.now() - 120_000).toISOString();
    writeFileSync(file, JSON.stringify({ config: a, snapshotsDir: null, lastUsed: old }));
    await withoutRegistration(async () => registerProject(a, null, home));
    expect(JSON.parse(readFileSync(file, "utf8")).lastUsed).toBe(old);
    registerProject(a, null, home);
    expect(JSON.parse(readFileSync(file, "utf8")).lastUsed).not.toBe(old);

    rmSync(b);
    expect((await registeredProjects(home)).map((r) => r.config)).toEqual([a]);
    expect(readdirSync(projectsDir(home))).toHaveLength(1);
  });
});
