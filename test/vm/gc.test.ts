// `supermachine gc` on real projects, through the CLI, in a home of its own (gc collects the
// whole home: it must not touch the shared cache). A 3-image project (a busybox root with a
// warmup, two children): a child's warmup tag changes, so its old snapshot is garbage; a pool
// restoring from it keeps it until the pool shuts down; a second registered project's snapshots
// in the shared directory survive with --all-configs and not without; --older-than keeps recent
// ones; Image.build's snapshots go only with --all.
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Image } from "../../src/index.js";
import { homePaths } from "../../src/paths.js";
import { cli as runCli } from "../helpers/run.js";

const work = mkdtempSync(join(tmpdir(), "sm-gc-test-"));
const home = join(work, "home");
const sharedBuiltin = homePaths().builtin;
const savedHome = process.env.SUPERMACHINE_HOME;

interface Row {
  name: string;
  key: string;
  status: string;
}
interface Entry {
  dir: string;
  name: string;
  key: string;
  bytes: number;
  reason?: string;
}
interface Report {
  dryRun: boolean;
  projects: string[];
  snapshots: { removed: Entry[]; kept: Entry[]; count: number; bytesFreed: number };
  bytesFreed: number;
  warnings: string[];
}

function cli(cwd: string, ...args: string[]) {
  return runCli(args, { cwd, timeout: 300_000, env: { ...process.env, SUPERMACHINE_HOME: home } });
}

async function build(cwd: string): Promise<Row[]> {
  const r = await cli(cwd, "build", "--json");
  if (r.status !== 0) throw new Error(`build failed (${r.status}): ${r.stdout}\n${r.stderr}`);
  return (JSON.parse(r.stdout) as { images: Row[] }).images;
}

async function gc(cwd: string, ...args: string[]): Promise<Report> {
  const r = await cli(cwd, "gc", "--json", ...args);
  if (r.status !== 0) throw new Error(`gc failed (${r.status}): ${r.stdout}\n${r.stderr}`);
  return JSON.parse(r.stdout) as Report;
}

const warmup = (what: string) => `async (vm) => { await vm.exec({ argv: ["sh", "-c", "echo ${what} > /srv-${what}"] }); }`;

/** A project in `dir`: `images` maps module names to their source. */
function writeProject(dir: string, config: string, images: Record<string, string>): string {
  mkdirSync(join(dir, "images"), { recursive: true });
  writeFileSync(join(dir, "supermachine.config.ts"), `import { defineConfig } from "supermachine/config";\nexport default defineConfig(${config});\n`);
  for (const [name, src] of Object.entries(images)) writeFileSync(join(dir, "images", `${name}.ts`), `import { defineImage } from "supermachine/config";\n${src}\n`);
  return dir;
}

const snapshotDir = (project: string, rows: Row[], name: string, dir = join(project, ".snapshots")) => join(dir, `${name}-${rows.find((r) => r.name === name)!.key.slice(0, 16)}`);

let a: string;
let first: Row[];
let second: Row[];

beforeAll(async () => {
  // Only what gc must not collect from the shared cache is shared: the built-in busybox layout.
  mkdirSync(home, { recursive: true });
  symlinkSync(sharedBuiltin, join(home, "builtin"));
  process.env.SUPERMACHINE_HOME = home;
  a = writeProject(join(work, "a"), '{ images: ["./images/*.ts"], snapshotsDir: "./.snapshots" }', {
    base: `export default defineImage({ ref: "builtin:busybox", warmup: ${warmup("base")} });`,
    left: `import base from "./base";\nexport default defineImage({ from: base, warmupTag: "left-1", warmup: ${warmup("left")} });`,
    right: `import base from "./base";\nexport default defineImage({ from: base, warmupTag: "right-1", warmup: ${warmup("right")} });`,
  });
  first = await build(a);
  const left = join(a, "images", "left.ts");
  writeFileSync(left, readFileSync(left, "utf8").replace("left-1", "left-2"));
  second = await build(a);
}, 300_000);

afterAll(() => {
  if (savedHome === undefined) delete process.env.SUPERMACHINE_HOME;
  else process.env.SUPERMACHINE_HOME = savedHome;
  rmSync(work, { recursive: true, force: true });
});

describe("supermachine gc", () => {
  it("lists exactly the child's old snapshot; a pool restoring from it keeps it until it shuts down", async () => {
    expect(first.map((r) => r.status)).toEqual(["baked", "baked", "baked"]);
    expect(second.map((r) => [r.name, r.status])).toEqual([
      ["base", "cached"],
      ["left", "baked"],
      ["right", "cached"],
    ]);
    const old = snapshotDir(a, first, "left");
    const dry = await gc(a, "--dry-run");
    expect(dry.dryRun).toBe(true);
    expect(dry.snapshots.removed.map((s) => s.dir)).toEqual([old]);
    expect(dry.snapshots.removed[0]!.bytes).toBeGreaterThan(0);
    expect(existsSync(old)).toBe(true);

    const pool = await (await Image.fromSnapshot(old)).pool({ min: 1, max: 1 });
    try {
      const vm = await pool.acquire();
      expect((await vm.exec({ argv: ["cat", "/srv-left"] })).stdout.toString()).toBe("left\n");
      await vm.release();
      const held = await gc(a);
      expect(held.snapshots.removed).toEqual([]);
      expect(held.snapshots.kept.find((k) => k.dir === old)).toMatchObject({ reason: "in-use" });
      expect(existsSync(old)).toBe(true);
    } finally {
      await pool.shutdown();
    }
    const freed = await gc(a);
    expect(freed.snapshots.removed.map((s) => s.dir)).toEqual([old]);
    expect(freed.snapshots.bytesFreed).toBeGreaterThan(0);
    expect(freed.bytesFreed).toBeGreaterThanOrEqual(freed.snapshots.bytesFreed);
    expect(existsSync(old)).toBe(false);
    // What the project uses is all there, and the build has nothing to do.
    for (const name of ["base", "left", "right"]) expect(existsSync(snapshotDir(a, second, name))).toBe(true);
    expect((await build(a)).map((r) => r.status)).toEqual(["cached", "cached", "cached"]);
    expect(readdirSync(join(a, ".snapshots")).filter((n) => n.includes(".tmp-") || n.endsWith(".lock"))).toEqual([]);
  });

  it("keeps a registered project's snapshots with --all-configs, not without", async () => {
    // Project b keeps its snapshots in the default directory, which gc in a collects too.
    const b = writeProject(join(work, "b"), '{ images: ["./images/*.ts"] }', {
      solo: `export default defineImage({ ref: "builtin:busybox", warmupTag: "b", warmup: ${warmup("solo")} });`,
    });
    const rows = await build(b);
    const solo = snapshotDir(b, rows, "solo", join(home, "snapshots"));
    expect(existsSync(solo)).toBe(true);
    expect(readdirSync(join(home, "projects"))).toHaveLength(2);

    const all = await gc(a, "--all-configs", "--dry-run");
    expect(all.projects.sort()).toEqual([join(a, "supermachine.config.ts"), join(b, "supermachine.config.ts")].sort());
    expect(all.snapshots.removed).toEqual([]);
    expect(all.snapshots.kept.find((k) => k.dir === solo)).toMatchObject({ reason: "referenced" });
    expect((await gc(a, "--dry-run")).snapshots.removed.map((s) => s.dir)).toEqual([solo]);

    expect((await gc(a, "--all-configs")).snapshots.removed).toEqual([]);
    expect(existsSync(solo)).toBe(true);
    // A registered project that does not load cannot say what it uses: its directory is left alone.
    const bConfig = join(b, "supermachine.config.ts");
    const good = readFileSync(bConfig, "utf8");
    writeFileSync(bConfig, "export default defineConfig({ images: [");
    const broken = await gc(a, "--all-configs");
    expect(broken.snapshots.removed).toEqual([]);
    expect(broken.snapshots.kept.find((k) => k.dir === solo)).toMatchObject({ reason: "unreadable-project" });
    expect(broken.warnings.join("\n")).toContain(`the registered project ${bConfig} cannot be loaded (CONFIG_LOAD_FAILED`);
    writeFileSync(bConfig, good);
    // A registered project that is gone is forgotten, and no longer keeps anything.
    rmSync(b, { recursive: true, force: true });
    const after = await gc(a, "--all-configs");
    expect(after.projects).toEqual([join(a, "supermachine.config.ts")]);
    expect(after.snapshots.removed.map((s) => s.dir)).toEqual([solo]);
    expect(readdirSync(join(home, "projects"))).toHaveLength(1);
  });

  it("with --older-than, keeps snapshots more recent than that", async () => {
    const right = join(a, "images", "right.ts");
    const before = await build(a);
    writeFileSync(right, readFileSync(right, "utf8").replace("right-1", "right-2"));
    await build(a);
    const old = snapshotDir(a, before, "right");
    const recent = await gc(a, "--older-than", "1h");
    expect(recent.snapshots.removed).toEqual([]);
    expect(recent.snapshots.kept.find((k) => k.dir === old)).toMatchObject({ reason: "recent" });
    await new Promise((r) => setTimeout(r, 1_100));
    expect((await gc(a, "--older-than", "1s")).snapshots.removed.map((s) => s.dir)).toEqual([old]);
    expect(existsSync(old)).toBe(false);
  });

  it("removes Image.build's snapshots only with --all, and leaves what is not a snapshot", async () => {
    const image = await Image.build({ ref: "builtin:busybox", warmupTag: "gc-test", warmup: async (vm) => void (await vm.exec({ argv: ["true"] })) });
    expect(image.snapshotPath.startsWith(join(home, "snapshots"))).toBe(true);
    const foreign = join(home, "snapshots", "not-a-snapshot");
    mkdirSync(foreign);
    writeFileSync(join(foreign, "meta.json"), "{}");
    const without = await gc(a);
    expect(without.snapshots.removed).toEqual([]);
    expect(without.snapshots.kept.find((k) => k.dir === image.snapshotPath)).toMatchObject({ reason: "not-a-project-snapshot" });
    const text = await cli(a, "gc", "--dry-run");
    expect(text.stdout).toContain("kept 1 made outside a project (--all removes them)");
    const all = await gc(a, "--all");
    expect(all.snapshots.removed.map((s) => s.dir)).toEqual([image.snapshotPath]);
    expect(existsSync(image.snapshotPath)).toBe(false);
    expect(existsSync(foreign)).toBe(true);
    // The project's own snapshots are untouched, and its root filesystem with them.
    expect((await build(a)).map((r) => r.status)).toEqual(["cached", "cached", "cached"]);
  });
});
