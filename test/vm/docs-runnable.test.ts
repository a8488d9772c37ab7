// Every code block the docs mark runnable runs, as a user would run it, and does what the docs
// say. The convention: a fence whose info string has the word `runnable` (```js runnable,
// ```ts runnable group=hello file=sandboxes/app.ts, ```sh runnable). Blocks with the same
// `group=` in one document are the files of one project, written into a fresh directory inside
// this checkout (so `import "supermachine"` resolves to it, as in a project that installed it);
// a block without `group=` is a project of its own. A block's `file=` names its path (default
// main.mjs for js/ts, main.sh for sh); the project runs `node main.mjs` or `bash main.sh`. A
// `<!-- runnable output: text -->` line after a group's blocks is text its output must contain.
import { spawn } from "node:child_process";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qemuPids } from "../helpers/vm.js";

const ROOT = join(import.meta.dirname, "..", "..");
const WORK = join(ROOT, ".test-runnable");

interface Project {
  doc: string;
  name: string;
  files: Map<string, string>;
  outputs: string[];
}

/** The runnable projects of one markdown document. */
export function runnableProjects(doc: string, text: string): Project[] {
  const projects = new Map<string, Project>();
  const lines = text.split("\n");
  let last: Project | undefined;
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(\w+)\s+(.*\brunnable\b.*)$/.exec(lines[i]!);
    if (open) {
      const attrs = Object.fromEntries([...open[2]!.matchAll(/(\w+)=(\S+)/g)].map((m) => [m[1]!, m[2]!]));
      const name = attrs.group ?? `block-${i + 1}`;
      const p = projects.get(name) ?? { doc, name, files: new Map(), outputs: [] };
      projects.set(name, p);
      const body: string[] = [];
      for (i++; i < lines.length && !lines[i]!.startsWith("```"); i++) body.push(lines[i]!);
      p.files.set(attrs.file ?? (open[1] === "sh" ? "main.sh" : "main.mjs"), body.join("\n") + "\n");
      last = p;
      continue;
    }
    const out = /^<!-- runnable output: (.*) -->$/.exec(lines[i]!);
    if (out && last) last.outputs.push(out[1]!);
  }
  return [...projects.values()];
}

function run(cmd: string, args: string[], cwd: string): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve, reject) => {
    const c = spawn(cmd, args, { cwd, env: process.env, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    c.stdout.on("data", (d: Buffer) => (out += d.toString()));
    c.stderr.on("data", (d: Buffer) => (out += d.toString()));
    c.on("error", reject);
    c.on("exit", (code) => resolve({ code, out }));
  });
}

const docs = ["README.md", ...readdirSync(join(ROOT, "docs")).filter((f) => f.endsWith(".md")).map((f) => `docs/${f}`)];
const projects = docs.flatMap((d) => runnableProjects(d, readFileSync(join(ROOT, d), "utf8")));

afterAll(() => rmSync(WORK, { recursive: true, force: true }));

describe("runnable code blocks of the docs", () => {
  it("include the README's hello and its declarative example", () => {
    const readme = projects.filter((p) => p.doc === "README.md");
    expect(readme.length).toBeGreaterThanOrEqual(2);
    expect(readme.some((p) => [...p.files.keys()].some((f) => f.endsWith(".ts")))).toBe(true);
  });

  it("parses groups, files and expected output", () => {
    const md = "```js runnable\nconsole.log(1)\n```\n<!-- runnable output: 1 -->\n```ts runnable group=g file=a.ts\nexport {}\n```\n```js\nnot run\n```\n```js runnable group=g\nx\n```\n";
    const p = runnableProjects("x.md", md);
    expect(p.map((x) => [x.name, [...x.files.keys()], x.outputs])).toEqual([
      ["block-1", ["main.mjs"], ["1"]],
      ["g", ["a.ts", "main.mjs"], []],
    ]);
  });

  for (const p of projects) {
    it(`${p.doc}: ${p.name} runs`, async () => {
      const dir = join(WORK, `${p.doc.replace(/\W+/g, "-")}-${p.name}`);
      rmSync(dir, { recursive: true, force: true });
      for (const [file, text] of p.files) {
        mkdirSync(dirname(join(dir, file)), { recursive: true });
        writeFileSync(join(dir, file), text);
      }
      const before = qemuPids().length;
      const r = p.files.has("main.sh") ? await run("bash", ["main.sh"], dir) : await run(process.execPath, ["main.mjs"], dir);
      expect(r.code, r.out).toBe(0);
      for (const o of p.outputs) expect(r.out).toContain(o);
      expect(qemuPids().length).toBeLessThanOrEqual(before);
    }, 300_000);
  }
});
