// The folders of src/ form layers (docs/design.md draws them): a folder imports only folders of a
// lower tier, never one of its own tier or above, so data flows one way. The files directly in
// src/ are the base below every tier; index.ts is the public surface above them all. Type-only
// imports count: a public declaration must not reach up either. Between files, no import cycle
// is allowed among the imports that run (value imports); a type-only import may close one only
// inside a folder (the public classes name each other: image.pool() returns a Pool,
// pool.acquire() a Vm, vm.snapshot() an Image).
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, normalize, relative } from "node:path";
import { describe, expect, it } from "vitest";

const src = join(import.meta.dirname, "..", "..", "src");

/** Lowest first. Folders of one tier are peers: neither imports the other. */
export const TIERS: readonly (readonly string[])[] = [
  ["schema"], // options table, key primitives, zod → OptionError
  ["oci", "agent", "net", "remote"], // image formats and references; the agent protocol's host side; the egress proxy; the client of `supermachine serve`
  ["store", "engine"], // snapshots, image entries, blobs, publish, locks; QEMU
  ["registry", "session"], // the distribution API; what a running guest can do
  ["image", "transfer", "config", "graph"], // refs → root filesystems; the snapshot cache; config files; the image graph and keys
  ["bake"], // one node made ready: key, store, cache, bake
  ["runtime"], // Image, Pool, Vm
  ["project", "doctor", "setup"], // build, watch, gc, verify, loadPools; host checks; host setup
  ["server"], // supermachine serve: HTTP, keys, sandboxes, the E2B profile
  ["cli"],
];

const tierOf = new Map(TIERS.flatMap((t, i) => t.map((f) => [f, i] as const)));

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? files(p) : p.endsWith(".ts") ? [p] : [];
  });
}

const folderOf = (path: string): string => {
  const parts = relative(src, path).split("/");
  return parts.length === 1 ? (parts[0]!.startsWith("index.") ? "(surface)" : "(base)") : parts[0]!;
};

interface Edge {
  from: string;
  to: string;
  /** Erased at run time: `import type`, `export type`, or every name marked `type`. */
  typeOnly: boolean;
}

/** Every relative import and re-export of every file under src/, dynamic imports included. */
export function importEdges(root = src): Edge[] {
  const edges: Edge[] = [];
  for (const f of files(root)) {
    const text = readFileSync(f, "utf8");
    const add = (spec: string, typeOnly: boolean) => edges.push({ from: f, to: normalize(join(dirname(f), spec)).replace(/\.js$/, ".ts"), typeOnly });
    for (const m of text.matchAll(/^(import|export)\s+(type\s+)?([^;]*?)\s*from\s+"(\.[^"]+)"/gm)) {
      const names = m[3]!.match(/^\{([^}]*)\}$/s)?.[1];
      const allTyped = names !== undefined && names.split(",").map((n) => n.trim()).filter(Boolean).every((n) => n.startsWith("type "));
      add(m[4]!, m[2] !== undefined || allTyped);
    }
    for (const m of text.matchAll(/^import\s+"(\.[^"]+)"/gm)) add(m[1]!, false);
    for (const m of text.matchAll(/\bimport\(\s*"(\.[^"]+)"\s*\)/g)) add(m[1]!, false);
  }
  return edges;
}

/** Imports that point to a folder of the same tier or a higher one. */
export function upwardImports(edges: Edge[]): string[] {
  const bad: string[] = [];
  for (const e of edges) {
    const a = folderOf(e.from);
    const b = folderOf(e.to);
    if (a === b || a === "(surface)" || b === "(base)") continue;
    const ta = tierOf.get(a);
    const tb = tierOf.get(b);
    const why =
      a === "(base)" ? "the base imports no folder"
      : b === "(surface)" ? "nothing imports the public surface"
      : ta === undefined ? `${a} is in no tier of TIERS`
      : tb === undefined ? `${b} is in no tier of TIERS`
      : tb >= ta ? (tb === ta ? `${b} is a peer of ${a}` : `${b} is above ${a}`)
      : undefined;
    if (why) bad.push(`${relative(src, e.from)} → ${relative(src, e.to)}${e.typeOnly ? " (type-only)" : ""}: ${why}`);
  }
  return bad;
}

/** A cycle of file imports, or undefined; type-only imports count only across folders. */
export function fileCycle(edges: Edge[]): string[] | undefined {
  const g = new Map<string, string[]>();
  for (const e of edges) {
    if (e.typeOnly && folderOf(e.from) === folderOf(e.to)) continue;
    (g.get(e.from) ?? g.set(e.from, []).get(e.from)!).push(e.to);
  }
  const state = new Map<string, 1 | 2>();
  const stack: string[] = [];
  const visit = (u: string): string[] | undefined => {
    state.set(u, 1);
    stack.push(u);
    for (const v of g.get(u) ?? []) {
      if (state.get(v) === 1) return [...stack.slice(stack.indexOf(v)), v].map((p) => relative(src, p));
      if (!state.has(v)) {
        const c = visit(v);
        if (c) return c;
      }
    }
    state.set(u, 2);
    stack.pop();
    return undefined;
  };
  for (const u of g.keys()) {
    if (state.has(u)) continue;
    const c = visit(u);
    if (c) return c;
  }
  return undefined;
}

describe("source layout", () => {
  const edges = importEdges();

  it("puts every folder of src/ in a tier", () => {
    const folders = new Set(files(src).map(folderOf).filter((f) => !f.startsWith("(")));
    expect([...folders].filter((f) => !tierOf.has(f))).toEqual([]);
    expect([...tierOf.keys()].filter((f) => !folders.has(f))).toEqual([]);
  });

  it("imports only from lower tiers", () => {
    expect(upwardImports(edges)).toEqual([]);
  });

  it("has no cycle between files", () => {
    expect(fileCycle(edges)).toBeUndefined();
  });

  it("catches an upward import, a peer import and a file cycle", () => {
    const at = (p: string) => join(src, p);
    const e = (from: string, to: string, typeOnly = false): Edge => ({ from: at(from), to: at(to), typeOnly });
    expect(upwardImports([e("store/a.ts", "bake/b.ts", true)])).toEqual(["store/a.ts → bake/b.ts (type-only): bake is above store"]);
    expect(upwardImports([e("image/a.ts", "graph/b.ts")])).toEqual(["image/a.ts → graph/b.ts: graph is a peer of image"]);
    expect(upwardImports([e("errors.ts", "schema/a.ts")])).toEqual(["errors.ts → schema/a.ts: the base imports no folder"]);
    expect(upwardImports([e("bake/a.ts", "store/b.ts"), e("index.ts", "cli/x.ts")])).toEqual([]);
    expect(fileCycle([e("runtime/a.ts", "runtime/b.ts"), e("runtime/b.ts", "runtime/a.ts")])).toEqual(["runtime/a.ts", "runtime/b.ts", "runtime/a.ts"]);
    expect(fileCycle([e("runtime/a.ts", "runtime/b.ts"), e("runtime/b.ts", "runtime/a.ts", true)])).toBeUndefined();
    expect(fileCycle([e("a.ts", "b.ts"), e("b.ts", "c.ts"), e("c.ts", "a.ts", true)])).toBeUndefined();
  });

  it("parses type-only imports as such", () => {
    const typed = edges.filter((x) => x.typeOnly).length;
    expect(typed).toBeGreaterThan(20);
    expect(edges.length - typed).toBeGreaterThan(200);
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
