// The folders of src/ form layers: each imports only folders below it, so there is no import
// cycle between folders (type-only imports count too). index.ts is the surface above them all;
// errors.ts, log.ts, paths.ts and deadline.ts are the base below them all.
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, normalize, relative } from "node:path";
import { describe, expect, it } from "vitest";

const src = join(import.meta.dirname, "..", "..", "src");

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? files(p) : p.endsWith(".ts") ? [p] : [];
  });
}

function folderOf(path: string): string {
  const parts = relative(src, path).split("/");
  if (parts.length === 1) return parts[0]!.startsWith("index") ? "(surface)" : "(base)";
  return parts[0]!;
}

function folderGraph(): Map<string, Set<string>> {
  const g = new Map<string, Set<string>>();
  for (const f of files(src)) {
    const from = folderOf(f);
    for (const m of readFileSync(f, "utf8").matchAll(/^(?:import|export)\s[^;]*?from\s+"(\.[^"]+)"/gm)) {
      const to = folderOf(normalize(join(dirname(f), m[1]!)));
      if (to !== from) (g.get(from) ?? g.set(from, new Set()).get(from)!).add(to);
    }
  }
  return g;
}

function findCycle(g: Map<string, Set<string>>): string[] | undefined {
  const state = new Map<string, 1 | 2>();
  const stack: string[] = [];
  const visit = (u: string): string[] | undefined => {
    state.set(u, 1);
    stack.push(u);
    for (const v of g.get(u) ?? []) {
      if (state.get(v) === 1) return [...stack.slice(stack.indexOf(v)), v];
      if (!state.has(v)) {
        const c = visit(v);
        if (c) return c;
      }
    }
    state.set(u, 2);
    stack.pop();
    return undefined;
  };
  for (const u of g.keys()) if (!state.has(u)) {
    const c = visit(u);
    if (c) return c;
  }
  return undefined;
}

describe("source layout", () => {
  it("has no import cycle between the folders of src/", () => {
    const g = folderGraph();
    expect(g.size).toBeGreaterThan(8);
    expect(findCycle(g)).toBeUndefined();
  });

  it("keeps QMP inside the engine and process.exit inside the CLI", () => {
    for (const f of files(src)) {
      const text = readFileSync(f, "utf8");
      const folder = folderOf(f);
      if (folder !== "engine") expect(text, f).not.toMatch(/\bqmp\b\.|QmpClient/);
      if (folder !== "cli") expect(text, f).not.toMatch(/process\.exit\(/);
    }
  });
});
