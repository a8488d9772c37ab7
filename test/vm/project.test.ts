// A 20-image project (test/fixtures/monorepo) through the CLI, as a user runs it: build bakes
// everything once and then reports all cached; keys do not depend on where the project is;
// an edit to a helper changes exactly the keys of the images that import it and their
// descendants; why names what changed; --frozen fails on what is missing; two processes
// building at once bake each image once; loadPools hands out the configured pools.
import { spawn } from "node:child_process";
import { appendFileSync, cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadPools } from "../../src/index.js";
import { cli as runCli } from "../helpers/run.js";

const root = join(import.meta.dirname, "..", "..");
const fixture = join(root, "test", "fixtures", "monorepo");
const work = mkdtempSync(join(tmpdir(), "sm-project-test-"));
afterAll(() => rmSync(work, { recursive: true, force: true }));

interface Row {
  name: string;
  key: string;
  status: string;
  parent: string | null;
  ms: number;
}

function copyProject(name: string): string {
  const dir = join(work, name);
  cpSync(fixture, dir, { recursive: true });
  return dir;
}

function cli(cwd: string, ...args: string[]) {
  return runCli(args, { cwd, timeout: 300_000 });
}

async function build(cwd: string, ...args: string[]): Promise<Row[]> {
  const r = await cli(cwd, "build", "--json", ...args);
  if (r.status !== 0 && !args.includes("--frozen")) throw new Error(`build failed (${r.status}): ${r.stdout}\n${r.stderr}`);
  return (JSON.parse(r.stdout) as { images: Row[] }).images;
}

const keys = (rows: Row[]) => Object.fromEntries(rows.map((r) => [r.name, r.key]));
const changed = (a: Row[], b: Row[]) => b.filter((r) => keys(a)[r.name] !== r.key).map((r) => r.name).sort();

let project: string;
let first: Row[];

beforeAll(async () => {
  project = copyProject("a");
  first = await build(project);
}, 600_000);

describe("a 20-image project", () => {
  it("bakes every image once, parents first, then reports all cached", async () => {
    expect(first).toHaveLength(20);
    expect(first.every((r) => r.status === "baked")).toBe(true);
    const pos = (n: string) => first.findIndex((r) => r.name === n);
    expect(pos("base")).toBeLessThan(pos("tools"));
    expect(pos("tools")).toBeLessThan(pos("tool-app-3"));
    expect(pos("chain-2")).toBeLessThan(pos("chain-3"));
    expect(first.find((r) => r.name === "chain-3")!.parent).toBe("chain-2");
    const snapshots = readdirSync(join(project, ".snapshots")).filter((n) => !n.endsWith(".lock"));
    const again = await build(project);
    expect(again.map((r) => r.status)).toEqual(Array(20).fill("cached"));
    expect(keys(again)).toEqual(keys(first));
    // Nothing was baked: no new snapshot directory.
    expect(readdirSync(join(project, ".snapshots")).filter((n) => !n.endsWith(".lock"))).toEqual(snapshots);
  });

  it("gives the same keys to the project copied elsewhere", async () => {
    const copy = copyProject("b");
    rmSync(join(copy, ".snapshots"), { recursive: true, force: true });
    const rows = await build(copy, "--dry-run");
    expect(keys(rows)).toEqual(keys(first));
    expect(rows.every((r) => r.status === "would-bake")).toBe(true);
  });

  it("changes exactly the keys of what imports an edited helper, and their descendants", async () => {
    const dir = copyProject("c");
    // Comments, formatting and files nobody imports change no key.
    appendFileSync(join(dir, "lib/tools.ts"), "\n// a comment, and formatting:\n\n\n");
    appendFileSync(join(dir, "lib/unused.ts"), "export const alsoUnused = 2;\n");
    expect(changed(first, await build(dir, "--dry-run"))).toEqual([]);
    // A helper one image imports: that image and its descendants.
    writeFileSync(join(dir, "lib/chain.ts"), readFileSync(join(dir, "lib/chain.ts"), "utf8").replace("echo chain >", "echo chain-v2 >"));
    expect(changed(first, await build(dir, "--dry-run"))).toEqual(["chain-1", "chain-2", "chain-3"]);
    writeFileSync(join(dir, "lib/tools.ts"), readFileSync(join(dir, "lib/tools.ts"), "utf8").replace("tool says hello", "tool says hi"));
    expect(changed(first, await build(dir, "--dry-run"))).toEqual(["chain-1", "chain-2", "chain-3", ...["1", "2", "3", "4", "5", "6"].map((i) => `tool-app-${i}`), "tools"].sort());
  });

  it("explains a rebake with why, fails --frozen naming what is missing, then bakes only that", async () => {
    writeFileSync(join(project, "lib/chain.ts"), readFileSync(join(project, "lib/chain.ts"), "utf8").replace("echo chain >", "echo chain-v3 >"));
    const why = JSON.parse((await cli(project, "why", "chain-1", "--json")).stdout) as { name: string; cached: boolean; changes: { input: string }[] };
    expect(why).toMatchObject({ name: "chain-1", cached: false });
    expect(why.changes.map((c) => c.input)).toEqual(["module:lib/chain.ts"]);
    const whyChild = JSON.parse((await cli(project, "why", "chain-3", "--json")).stdout) as { changes: { input: string }[] };
    expect(whyChild.changes.map((c) => c.input)).toEqual(["parent"]);
    const text = await cli(project, "why", "chain-1");
    expect(text.stdout).toContain("module:lib/chain.ts");
    const whyTools = JSON.parse((await cli(project, "why", "tools", "--json")).stdout) as { cached: boolean; changes: unknown[] };
    expect(whyTools).toMatchObject({ cached: true, changes: [] });

    const frozen = await cli(project, "build", "--frozen");
    expect(frozen.status).toBe(1);
    expect(frozen.stderr).toMatch(/BUILD_FROZEN_MISSING|not baked: chain-1 .*chain-2 .*chain-3/);
    const rows = await build(project);
    expect(rows.filter((r) => r.status === "baked").map((r) => r.name).sort()).toEqual(["chain-1", "chain-2", "chain-3"]);
    expect(JSON.parse((await cli(project, "why", "chain-1", "--json")).stdout)).toMatchObject({ cached: true });
  });

  it("lists the images and prints the graph", async () => {
    const ls = JSON.parse((await cli(project, "ls", "--json")).stdout) as { images: { name: string; cached: boolean; parent: string | null; sizeBytes: number | null }[] };
    expect(ls.images).toHaveLength(20);
    expect(ls.images.every((i) => i.cached && (i.sizeBytes ?? 0) > 0)).toBe(true);
    expect(ls.images.find((i) => i.name === "web-app-2")!.parent).toBe("web");
    const g = JSON.parse((await cli(project, "graph", "--json")).stdout) as { images: { name: string; children: string[] }[] };
    expect(g.images.find((i) => i.name === "chain-1")!.children).toEqual(["chain-2"]);
    expect((await cli(project, "graph")).stdout).toMatch(/^base {2}\(builtin:busybox\)\n/);
  });

  it("runs a command on a project image by name", async () => {
    const r = await cli(project, "run", "tool-app-4", "--", "sh", "-c", "hello-tool; cat /srv/base /srv/tools /srv/tool-app-4; echo $PROJECT");
    expect(r.status).toBe(0);
    expect(r.stdout).toBe("tool says hello\nbase\ntools\ntool-app-4\nmonorepo\n");
    const bad = await cli(project, "run", "--memory", "512", "tools", "--", "true");
    expect(bad.status).toBe(2);
    expect(bad.stderr).toContain("--memory does not apply to tools");
  });

  it("hands out the configured pools; frozen fails naming what is not baked", async () => {
    const pools = await loadPools({ cwd: join(project, "images"), frozen: true });
    try {
      expect(Object.keys(pools).sort()).toEqual(["deep", "tools"]);
      const vm = await pools.deep!.acquire();
      expect((await vm.exec({ argv: ["cat", "/srv/chain", "/srv/chain-2", "/srv/chain-3"] })).stdout.toString()).toBe("chain-v3\nchain-2\nchain-3\n");
      await vm.release();
      expect(pools.tools!.stats()).toMatchObject({ min: 1, max: 2 });
    } finally {
      await pools.close();
    }
    const dir = copyProject("d");
    rmSync(join(dir, ".snapshots"), { recursive: true, force: true });
    await expect(loadPools({ cwd: dir, frozen: true })).rejects.toMatchObject({ code: "BUILD_FROZEN_MISSING", message: expect.stringContaining("chain-3") });
  });

  it("bakes each image once when two processes build the same project at once", async () => {
    const dir = copyProject("e");
    rmSync(join(dir, ".snapshots"), { recursive: true, force: true });
    const names = ["chain-3", "tool-app-1"];
    const run = () =>
      new Promise<Row[]>((resolve, reject) => {
        const p = spawn(process.execPath, [join(root, "dist/src/cli/main.js"), "build", "--json", ...names], { cwd: dir, stdio: ["ignore", "pipe", "inherit"] });
        let out = "";
        p.stdout.on("data", (c: Buffer) => (out += c.toString()));
        p.on("exit", (code) => (code === 0 ? resolve((JSON.parse(out) as { images: Row[] }).images) : reject(new Error(`exit ${code}: ${out}`))));
      });
    const [a, b] = await Promise.all([run(), run()]);
    const all = [...a, ...b];
    for (const n of ["base", "chain-1", "chain-2", "chain-3", "tools", "tool-app-1"]) {
      const statuses = all.filter((r) => r.name === n).map((r) => r.status).sort();
      expect(statuses, n).toEqual(["baked", "cached"]);
    }
    expect(keys(a)).toEqual(keys(b));
    expect(existsSync(join(dir, ".snapshots"))).toBe(true);
  }, 600_000);
});
