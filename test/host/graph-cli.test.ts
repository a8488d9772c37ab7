// `supermachine graph --format svg|dot|mermaid` run as a user would (dist/), on a project of three
// busybox images (a root, its child, a grandchild). The keys and cached state come from a dry run,
// which boots nothing. The SVG must be well-formed XML naming every image, Graphviz's own `dot`
// must accept the DOT, an unknown format is a usage error naming the choices, and --output writes
// the file instead of stdout.
import { DOMParser } from "@xmldom/xmldom";
import { existsSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { cli as runCli, run } from "../helpers/run.js";

const PROJECT = `import { defineConfig, defineImage } from "supermachine/config";
const base = defineImage({ ref: "builtin:busybox" });
const child = defineImage({ from: base, env: { LEVEL: "child" } });
const grandchild = defineImage({ from: child, env: { LEVEL: "grandchild" } });
export default defineConfig({ images: { base, child, grandchild } });
`;
const NAMES = ["base", "child", "grandchild"];

const dir = realpathSync(mkdtempSync(join(tmpdir(), "sm-graph-cli-")));
writeFileSync(join(dir, "supermachine.config.ts"), PROJECT);
const config = join(dir, "supermachine.config.ts");
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const cli = (args: string[], env: NodeJS.ProcessEnv = {}) => runCli(args, { cwd: dir, timeout: 120_000, env: { ...process.env, ...env } });

function parseSvg(xml: string) {
  const problems: string[] = [];
  const doc = new DOMParser({ onError: (level, msg) => void problems.push(`${level}: ${msg}`) }).parseFromString(xml, "image/svg+xml");
  expect(problems).toEqual([]);
  return doc.documentElement!;
}

describe("supermachine graph --format", () => {
  it("svg: a standalone SVG naming every image with its key, not baked", async () => {
    const r = await cli(["graph", "--format", "svg", "-c", config]);
    expect(r.status, r.stderr).toBe(0);
    const root = parseSvg(r.stdout);
    expect(root.localName).toBe("svg");
    expect(root.namespaceURI).toBe("http://www.w3.org/2000/svg");
    const texts = Array.from(root.getElementsByTagName("text")).map((t) => t.textContent);
    for (const n of NAMES) expect(texts).toContain(n);
    expect(texts.filter((t) => /^key [0-9a-f]{12}$/.test(t ?? ""))).toHaveLength(3);
    expect(texts.filter((t) => t === "not baked")).toHaveLength(3);
    expect(Array.from(root.getElementsByTagName("g")).map((g) => g.getAttribute("data-image"))).toEqual(NAMES);
  });

  it("dot: Graphviz's dot draws it", async () => {
    const r = await cli(["graph", "--format", "dot", "-c", config]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^digraph /);
    expect(r.stdout).toContain(`"base" -> "child";`);
    expect(r.stdout).toContain(`"child" -> "grandchild";`);
    const drawn = await run("dot", ["-Tsvg"], { input: r.stdout, timeout: 60_000 });
    expect(drawn.error?.message).toBeUndefined();
    expect(drawn.status, drawn.stderr).toBe(0);
    expect(drawn.stderr).toBe("");
    const texts = Array.from(parseSvg(drawn.stdout).getElementsByTagName("text")).map((t) => t.textContent);
    for (const n of NAMES) expect(texts).toContain(n);
  });

  it("mermaid: a flowchart with sanitized ids and the two edges", async () => {
    const r = await cli(["graph", "--format", "mermaid", "-c", config]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.startsWith("flowchart TD\n")).toBe(true);
    expect(r.stdout).toMatch(/^ {2}n0\["base<br\/>key [0-9a-f]{12}<br\/>not baked"\]$/m);
    expect(r.stdout).toContain("  n0 --> n1\n");
    expect(r.stdout).toContain("  n1 --> n2\n");
  });

  it("text stays the tree, and --output writes the file (atomically) instead of stdout", async () => {
    const text = await cli(["graph", "-c", config]);
    expect(text.status, text.stderr).toBe(0);
    expect(text.stdout).toBe("base  (builtin:busybox)\n└─ child\n   └─ grandchild\n");

    const out = join(dir, "graph.svg");
    writeFileSync(out, "old contents");
    const r = await cli(["graph", "--format", "svg", "--output", out, "-c", config]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toBe("");
    const texts = Array.from(parseSvg(readFileSync(out, "utf8")).getElementsByTagName("text")).map((t) => t.textContent);
    for (const n of NAMES) expect(texts).toContain(n);
    expect(readdirSync(dir).filter((n) => n.includes(".tmp-"))).toEqual([]);

    const md = join(dir, "graph.mmd");
    expect((await cli(["graph", "--format", "mermaid", "-o", md, "-c", config])).status).toBe(0);
    expect(readFileSync(md, "utf8").startsWith("flowchart TD\n")).toBe(true);
  });

  it("stops with a clear message on an unknown format, --json with a format, or a file it cannot write", async () => {
    const nope = await cli(["graph", "--format", "nope", "-c", config]);
    expect(nope.status).toBe(2);
    expect(nope.stderr).toContain('--format "nope"');
    expect(nope.stderr).toContain("text, svg, dot, mermaid");
    expect(nope.stdout).toBe("");

    const json = await cli(["graph", "--json", "--format", "svg", "-c", config]);
    expect(json.status).toBe(2);
    expect(json.stderr).toContain("--json prints the graph as JSON on stdout: it does not go with --format or --output");

    const missing = join(dir, "no-such-dir", "graph.svg");
    const bad = await cli(["graph", "--format", "svg", "-o", missing, "-c", config]);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toContain(`cannot write the graph to ${missing}`);
    expect(bad.stderr).toContain("hint: create the directory");
    expect(existsSync(join(dir, "no-such-dir"))).toBe(false);
  });

  it("draws images whose key cannot be computed without one, and says why on stderr", async () => {
    // A home without the built-in busybox: the root's key needs its manifest.
    const home = mkdtempSync(join(tmpdir(), "sm-graph-cli-home-"));
    try {
      const r = await cli(["graph", "--format", "mermaid", "-c", config], { SUPERMACHINE_HOME: home });
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toContain(`  n0["base<br/>not baked"]`);
      expect(r.stderr).toContain('warning: base is drawn without a key: built-in image "builtin:busybox" is not installed');
      expect(r.stderr).toContain("hint: run");
      expect(r.stderr).toContain("warning: drawn without a key too, as their parent has none: child, grandchild");
    } finally {
      rmSync(home, { recursive: true, force: true });
    }
  });
});
