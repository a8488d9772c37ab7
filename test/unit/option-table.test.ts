// The option table (src/schema/options.ts) is the one place an option is written: its schema in
// the API and in config declarations, its default, how a child image treats it, its part of the
// key and its name in `why`, and its line in the docs all come from the row.
import { describe, expect, it } from "vitest";
import { GraphError } from "../../src/errors.js";
import { buildImageGraph, type DeclaredImage } from "../../src/graph/graph.js";
import { diffInputs, keyOf, nodeInputs, type KeyParts } from "../../src/graph/keys.js";
import { imageDefinitionSchema, poolDeclarationSchema } from "../../src/schema/config.js";
import { optionsTable } from "../../src/schema/options-doc.js";
import { BUILD_DEFAULTS, buildOptions, buildSchema, POOL_DEFAULTS, poolOptions, poolSchema, type OptionRow } from "../../src/schema/options.js";

const rows = (t: object) => Object.entries(t) as [string, OptionRow][];

const parts: KeyParts = {
  parentKey: null,
  manifestDigest: "sha256:" + "a".repeat(64),
  workload: ["sh"],
  extraFiles: [{ guestPath: "/x", mode: 0o644, sha256: "f" }],
  module: null,
  // An engine of before the host's machine type and CPU model were in it: these keys are pinned
  // below, and what they test is the option table's part of the key, not the engine's.
  engine: { qemu: "q", accel: "tcg", kernelKey: "k", agentKey: "a", agentVersion: "4" } as KeyParts["engine"],
};
const image = (name: string, definition: object, from: string | null = null): DeclaredImage => ({ name, module: null, from, definition });

/** A value for each build option that differs from its default (a keyed one must change the key). */
const SAMPLES: Record<string, unknown> = {
  ref: "alpine",
  name: "n",
  memoryMib: 512,
  vcpus: 2,
  pullPolicy: "always",
  cmd: ["sleep", "1"],
  env: { A: "1" },
  guestPort: 8080,
  listenerRequired: true,
  extraFiles: [{ hostPath: "/etc/hostname", guestPath: "/y" }],
  warmupTag: "v2",
  warmup: async () => {},
  snapshotsDir: "/tmp/s",
  platform: "linux/arm64",
  insecureRegistries: ["r:5000"],
  onProgress: () => {},
  execLimits: { processes: 9 },
  network: { allow: ["pypi.org"] },
};

describe("the option table", () => {
  it("derives the schemas of Image.build, image.pool and config declarations from its rows", () => {
    expect(Object.keys(buildSchema.shape).sort()).toEqual(Object.keys(buildOptions).sort());
    expect(Object.keys(poolSchema.in.shape).sort()).toEqual(Object.keys(poolOptions).sort());
    expect(Object.keys(imageDefinitionSchema.shape).sort()).toEqual([...Object.keys(buildOptions), "from"].sort());
    expect(Object.keys(poolDeclarationSchema.shape).sort()).toEqual([...Object.keys(poolOptions), "image"].sort());
    for (const [name, row] of [...rows(buildOptions), ...rows(poolOptions)]) {
      expect(row.doc.length, name).toBeGreaterThan(10);
      expect(row.type.length, name).toBeGreaterThan(0);
    }
    for (const [name, row] of rows(buildOptions)) expect(row.child, name).toBeDefined();
  });

  it("accepts every sample in the API and in a declaration, and applies defaults only where options are resolved", () => {
    expect(Object.keys(SAMPLES).sort(), "a new build option needs a sample here").toEqual(Object.keys(buildOptions).sort());
    const { name: _n, ...declared } = SAMPLES;
    expect(() => buildSchema.parse(SAMPLES)).not.toThrow();
    expect(() => imageDefinitionSchema.parse({ ...declared, name: "n" })).not.toThrow();
    expect(buildSchema.parse({ ref: "alpine" })).toEqual({ ref: "alpine" });
    const node = buildImageGraph([image("a", { ref: "alpine" })]).spec("a");
    for (const [k, v] of Object.entries(BUILD_DEFAULTS)) expect((node as Record<string, unknown>)[k], k).toEqual(v);
    const pool = poolSchema.parse({});
    for (const [k, v] of Object.entries(POOL_DEFAULTS)) expect((pool as Record<string, unknown>)[k], k).toEqual(v);
    expect(poolDeclarationSchema.parse({ image: "a" })).toEqual({ image: "a" });
  });

  it("keys every keyed option under its own name, which is how why names its change", () => {
    const base = buildImageGraph([image("a", { ref: "alpine" })]).spec("a");
    const before = nodeInputs(base, parts);
    for (const [name, row] of rows(buildOptions)) {
      const changed = buildImageGraph([image("a", { ref: "alpine", [name]: SAMPLES[name] })]).spec("a");
      // extraFiles and cmd are keyed by what they resolve to (hashes, the workload): change those facts.
      const facts = name === "extraFiles" ? { ...parts, extraFiles: [{ guestPath: "/y", mode: 0o600, sha256: "e" }] } : name === "cmd" ? { ...parts, workload: ["sleep", "1"] } : parts;
      const after = nodeInputs(changed, facts);
      const names = diffInputs({ inputs: before }, { inputs: after }).map((c) => c.input);
      if (!row.key) {
        expect(keyOf(after), `${name} is not keyed`).toBe(keyOf(before));
        continue;
      }
      expect(keyOf(after), `${name} is keyed`).not.toBe(keyOf(before));
      const expected = row.why === "entries" ? ["env:A"] : row.why === "guestPath" ? ["extraFiles:/x", "extraFiles:/y"] : [name];
      expect(names, name).toEqual(expected);
    }
  });

  it("keeps the keys snapshots were made with before the table existed", () => {
    // Keys computed by v0.1.0 (ff3aae1) for these declarations: a cache keyed then still hits.
    const graph = buildImageGraph([
      image("a", { ref: "builtin:busybox" }),
      image("b", { env: { X: "1" }, extraFiles: [], warmupTag: "t", execLimits: { processes: 5 }, network: { allow: ["pypi.org"] } }, "a"),
      image("c", { ref: "alpine", memoryMib: 512, vcpus: 2, env: { A: "b" }, cmd: ["sh"], guestPort: 8080, listenerRequired: true, warmup: async () => {}, network: "none" }),
    ]);
    expect(keyOf(nodeInputs(graph.spec("a"), parts))).toBe("ff2c3483aa316fe240062a2334e6975b174f456eeffaa383e2509e19ba4a68bb");
    // b's key changed once, on purpose, in issue 21: its network option's key now holds the mode
    // (transparent egress became the default, which changes what a warmup can reach).
    expect(keyOf(nodeInputs(graph.spec("b"), { ...parts, parentKey: "p", manifestDigest: null }))).toBe("09d201479cb7bdd947ad23eb80d48f5d0345d002c0e40442184433943d4fff2d");
    expect(keyOf(nodeInputs(graph.spec("c"), parts))).toBe("62171e2d06d207df7761f1f956b78f08ad2073596655d3496ff7d2efb5333fdb");
  });

  it("treats each option in a child image as its row says", () => {
    const parent = image("p", { ref: "alpine", env: { A: "1", B: "1" }, execLimits: { processes: 5 }, warmupTag: "p", network: { allow: ["pypi.org"] } });
    for (const [name, row] of rows(buildOptions)) {
      const child = () => buildImageGraph([parent, image("c", { [name]: SAMPLES[name] }, "p")]).spec("c") as Record<string, unknown>;
      switch (row.child) {
        case "root":
          if (name === "ref") continue; // a child with ref is refused earlier (GRAPH_REF_AND_FROM)
          expect(child, name).toThrow(expect.objectContaining({ code: "GRAPH_CHILD_OPTION" }) as GraphError);
          break;
        case "same":
          expect(child, name).toThrow(expect.objectContaining({ code: "GRAPH_CHILD_SHAPE" }) as GraphError);
          break;
        case "merge":
          expect(child()[name], name).toEqual(name === "env" ? { A: "1", B: "1", ...(SAMPLES.env as object) } : { processes: 9 });
          break;
        case "own": {
          const inherited = buildImageGraph([parent, image("c", {}, "p")]).spec("c") as Record<string, unknown>;
          expect(inherited[name], `${name} is not inherited`).toEqual(buildImageGraph([image("x", { ref: "alpine" })]).spec("x")[name as "warmupTag"]);
          break;
        }
      }
    }
  });

  it("writes the docs tables from the rows", () => {
    for (const scope of ["build", "pool"] as const) {
      const table = optionsTable(scope);
      for (const name of Object.keys(scope === "build" ? buildOptions : poolOptions)) expect(table).toContain(`| \`${name}\` |`);
    }
  });
});
