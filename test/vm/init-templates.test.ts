// `supermachine init --template <name>`, for every template, as a user runs it: init into an
// empty directory, make the template's image available (offline: the test fixtures tagged with
// the names the templates use), build bakes everything then reports it cached, `run <image>` and
// the template's main.mjs (loadPools) work, the project type-checks, and a second init refuses to
// overwrite. `supermachine` is made resolvable from the project as `npm install` would: a
// node_modules/supermachine link to this checkout (whose dist/ must be built).
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import ts from "typescript";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tagImage } from "../../src/index.js";
import { run as runProcess, cli as runCli, type RunResult } from "../helpers/run.js";
// @ts-expect-error plain JavaScript helpers without types
import { ensureFixtures } from "../fixtures/build-fixtures.mjs";
// @ts-expect-error plain JavaScript helpers without types
import { ensureNodeFixture } from "../fixtures/node-fixture.mjs";

const root = join(import.meta.dirname, "..", "..");
const work = mkdtempSync(join(tmpdir(), "sm-init-test-"));
afterAll(() => rmSync(work, { recursive: true, force: true }));

function cli(cwd: string, ...args: string[]) {
  return runCli(args, { cwd, timeout: 300_000 });
}

function json<T>(r: RunResult): T {
  try {
    return JSON.parse(r.stdout) as T;
  } catch {
    throw new Error(`not JSON (exit ${r.status}): ${r.stdout}\n${r.stderr}`);
  }
}

/** What `npm install` would give the project, for main.mjs and the type-check. */
function linkPackages(dir: string): void {
  mkdirSync(join(dir, "node_modules", "@types"), { recursive: true });
  symlinkSync(root, join(dir, "node_modules", "supermachine"));
  symlinkSync(join(root, "node_modules", "@types", "node"), join(dir, "node_modules", "@types", "node"));
}

function typeErrors(dir: string): string[] {
  const read = ts.readConfigFile(join(dir, "tsconfig.json"), ts.sys.readFile);
  expect(read.error).toBeUndefined();
  const parsed = ts.parseJsonConfigFileContent(read.config, ts.sys, dir);
  expect(parsed.errors).toEqual([]);
  expect(parsed.fileNames.some((f) => f.endsWith("supermachine.config.ts"))).toBe(true);
  expect(parsed.fileNames.some((f) => f.endsWith("main.mjs"))).toBe(true);
  const program = ts.createProgram({ rootNames: parsed.fileNames, options: parsed.options });
  return ts.getPreEmitDiagnostics(program).map((d) => {
    const where = d.file ? `${d.file.fileName}:${d.file.getLineAndCharacterOfPosition(d.start ?? 0).line + 1}: ` : "";
    return where + ts.flattenDiagnosticMessageText(d.messageText, "\n");
  });
}

interface Case {
  template: string;
  images: string[];
  run: { image: string; argv: string[]; stdout: string | RegExp };
  main: { args: string[]; stdout: string | RegExp };
}

const CASES: Case[] = [
  {
    template: "python-sandbox",
    images: ["python"],
    run: { image: "python", argv: ["python3", "-c", "import sandbox_tools; sandbox_tools.result(6*7)"], stdout: '{"result": 42}\n' },
    main: { args: ["print('hello from a sandbox')"], stdout: "hello from a sandbox\n" },
  },
  {
    template: "node-sandbox",
    images: ["node"],
    run: { image: "node", argv: ["node", "/srv/runner.mjs", "6 * 7"], stdout: '{"result":42}\n' },
    main: { args: ["[1, 2, 3].map((n) => n * n)"], stdout: '{"result":[1,4,9]}\n' },
  },
  {
    template: "agent-runtime",
    images: ["runtime", "agent"],
    run: { image: "agent", argv: ["python3", "-c", "import tools; tools.report(hello=1)"], stdout: '{"agent": "example-agent", "hello": 1}\n' },
    main: { args: [], stdout: /^\{"agent": "example-agent", "task": "plan", "wrote": "\/workspace\/plan.txt"\}\n.*"task": "search".*\n.*"task": "write".*\n$/ },
  },
];

beforeAll(async () => {
  // The names the templates use, made available offline (what `supermachine tag` does). The node
  // image is Debian's nodejs (Node 18) tagged as node:20-bookworm-slim: the template only needs a `node`.
  const fx = (await ensureFixtures({ only: ["python"] })) as { python: { ref: string } };
  await tagImage(fx.python.ref, "python:3-bookworm");
  const node = (await ensureNodeFixture()) as { ref: string };
  await tagImage(node.ref, "node:20-bookworm-slim");
}, 600_000);

describe("supermachine init", () => {
  it("lists the templates, and names them when the name is unknown", async () => {
    const list = json<{ templates: { name: string; description: string; files: string[] }[] }>(await cli(work, "init", "--list", "--json"));
    expect(list.templates.map((t) => t.name)).toEqual(["agent-runtime", "node-sandbox", "python-sandbox"]);
    for (const t of list.templates) {
      expect(t.description).not.toBe("");
      expect(t.files).toEqual(expect.arrayContaining(["supermachine.config.ts", "README.md", "package.json", "tsconfig.json", ".gitignore", "main.mjs"]));
    }
    expect((await cli(work, "init", "--list")).stdout).toMatch(/^agent-runtime +a runtime image/m);
    const bad = await cli(work, "init", "--template", "rust-sandbox", join(work, "nope"));
    expect(bad.status).toBe(1);
    expect(bad.stderr).toContain('no template named "rust-sandbox"');
    expect(bad.stderr).toContain("hint: templates: agent-runtime, node-sandbox, python-sandbox");
    expect(json<{ error: { code: string } }>(await cli(work, "init", "--template", "rust-sandbox", "--json")).error.code).toBe("INIT_UNKNOWN_TEMPLATE");
    const missing = await cli(work, "init");
    expect(missing.status).toBe(2);
    expect(missing.stderr).toContain("--template <name> is required (templates: agent-runtime, node-sandbox, python-sandbox)");
  });

  for (const c of CASES) {
    it(`${c.template}: init, type-check, build, run, loadPools, and no overwrite`, async () => {
      const dir = join(work, c.template);
      const made = await cli(work, "init", "--template", c.template, dir);
      expect(made.status, made.stderr).toBe(0);
      expect(made.stdout).toContain(`Created a ${c.template} project in ${dir}`);
      expect(made.stdout).toContain("npx supermachine build");
      const pj = JSON.parse(readFileSync(join(dir, "package.json"), "utf8")) as { name: string; dependencies: Record<string, string> };
      expect(pj.name).toBe(c.template);
      expect(pj.dependencies.supermachine).toMatch(/^\^\d+\.\d+\.\d+/);
      expect(readFileSync(join(dir, ".gitignore"), "utf8")).toContain(".snapshots/");

      linkPackages(dir);
      expect(typeErrors(dir)).toEqual([]);

      const first = json<{ images: { name: string; status: string }[] }>(await cli(dir, "build", "--json"));
      expect(first.images.map((i) => [i.name, i.status])).toEqual(c.images.map((n) => [n, "baked"]));
      const again = json<{ images: { name: string; status: string }[] }>(await cli(dir, "build", "--json"));
      expect(again.images.map((i) => i.status)).toEqual(c.images.map(() => "cached"));

      const run = await cli(dir, "run", c.run.image, "--", ...c.run.argv);
      expect(run.status, run.stderr).toBe(0);
      if (typeof c.run.stdout === "string") expect(run.stdout).toBe(c.run.stdout);
      else expect(run.stdout).toMatch(c.run.stdout);

      const main = await runProcess(process.execPath, ["main.mjs", ...c.main.args], { cwd: dir, timeout: 120_000 });
      expect(main.status, main.stderr).toBe(0);
      if (typeof c.main.stdout === "string") expect(main.stdout).toBe(c.main.stdout);
      else expect(main.stdout).toMatch(c.main.stdout);

      // A second init refuses, naming what exists; --force overwrites (an edit is undone).
      const twice = await cli(work, "init", "--template", c.template, dir);
      expect(twice.status).toBe(1);
      expect(twice.stderr).toMatch(/files of the template already exist in .*: .*supermachine\.config\.ts/);
      expect(twice.stderr).toContain("--force");
      const err = json<{ error: { code: string; message: string } }>(await cli(work, "init", "--template", c.template, dir, "--json"));
      expect(err.error.code).toBe("INIT_FILES_EXIST");
      writeFileSync(join(dir, "README.md"), "mine\n");
      const forced = json<{ overwritten: string[] }>(await cli(work, "init", "--template", c.template, dir, "--force", "--json"));
      expect(forced.overwritten).toContain("README.md");
      expect(readFileSync(join(dir, "README.md"), "utf8")).toContain(`# ${c.template}`);
    });
  }

  it("refuses to overwrite a single existing file, and creates the rest nowhere", async () => {
    const dir = join(work, "partial");
    mkdirSync(join(dir, "lib"), { recursive: true });
    writeFileSync(join(dir, "lib", "warm.ts"), "// mine\n");
    const r = await cli(work, "init", "-t", "python-sandbox", dir);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(`a file of the template already exists in ${dir}: lib/warm.ts`);
    expect(readFileSync(join(dir, "lib", "warm.ts"), "utf8")).toBe("// mine\n");
    expect((await runProcess("ls", ["-A", dir])).stdout).toBe("lib\n");
  });
});
