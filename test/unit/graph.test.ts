// The image graph (src/graph): declarations checked and resolved without any VM: cycles,
// unknown parents, duplicate names, what a child may and may not set, inheritance, order.
import { describe, expect, it } from "vitest";
import { GraphError } from "../../src/errors.js";
import { buildImageGraph, type DeclaredImage } from "../../src/graph/graph.js";
import { diffInputs, keyOf, nodeInputs } from "../../src/graph/keys.js";

const img = (name: string, from: string | null, definition: DeclaredImage["definition"] = {}): DeclaredImage => ({
  name,
  module: `/p/sandboxes/${name}.ts`,
  from,
  definition: from === null ? { ref: "builtin:busybox", ...definition } : definition,
});

function graphError(images: DeclaredImage[]): GraphError {
  try {
    buildImageGraph(images);
  } catch (e) {
    expect(e).toBeInstanceOf(GraphError);
    return e as GraphError;
  }
  throw new Error("expected a GraphError");
}

describe("image graph", () => {
  it("orders parents first, inherits the snapshot's shape and merges env", () => {
    const g = buildImageGraph([
      img("leaf", "mid", { env: { C: "3", A: "leaf" } }),
      img("mid", "base", { env: { B: "2" }, warmupTag: "m1" }),
      img("base", null, { memoryMib: 512, vcpus: 2, env: { A: "1" }, cmd: ["sleep", "1"] }),
      img("other", null),
    ]);
    const order = g.order;
    expect(order.indexOf("base")).toBeLessThan(order.indexOf("mid"));
    expect(order.indexOf("mid")).toBeLessThan(order.indexOf("leaf"));
    expect(g.spec("leaf")).toMatchObject({ parent: "mid", ref: "builtin:busybox", memoryMib: 512, vcpus: 2, env: { A: "leaf", B: "2", C: "3" }, cmd: ["sleep", "1"], warmupTag: "default" });
    expect(g.spec("mid").warmupTag).toBe("m1");
    expect(g.spec("other")).toMatchObject({ memoryMib: 256, vcpus: 1, parent: null });
    expect(g.withAncestors(["leaf"])).toEqual(["base", "mid", "leaf"]);
    expect(g.descendants("base").sort()).toEqual(["leaf", "mid"]);
  });

  it("names every node of a cycle", () => {
    const e = graphError([img("a", "c"), img("b", "a"), img("c", "b"), img("root", null)]);
    expect(e.code).toBe("GRAPH_CYCLE");
    for (const n of ["a", "b", "c"]) expect(e.message).toContain(`"${n}"`);
    expect(graphError([img("self", "self")]).code).toBe("GRAPH_CYCLE");
  });

  it("lists the known images for an unknown parent", () => {
    const e = graphError([img("base", null), img("child", "bsae")]);
    expect(e).toMatchObject({ code: "GRAPH_UNKNOWN_PARENT" });
    expect(e.message).toContain('"bsae"');
    expect(e.hint).toBe("known images: base, child");
  });

  it("refuses duplicates, ref with from, and neither", () => {
    expect(graphError([img("x", null), img("x", null)]).code).toBe("GRAPH_DUPLICATE_NAME");
    expect(graphError([img("base", null), { ...img("c", "base"), definition: { ref: "builtin:busybox" } }]).code).toBe("GRAPH_REF_AND_FROM");
    expect(graphError([{ name: "nothing", module: "/p/n.ts", from: null, definition: {} }]).code).toBe("GRAPH_NO_BASE");
  });

  it("refuses a child that changes what its parent's snapshot fixed", () => {
    const shape = graphError([img("base", null, { memoryMib: 512 }), img("c", "base", { memoryMib: 1024 })]);
    expect(shape.code).toBe("GRAPH_CHILD_SHAPE");
    expect(shape.message).toContain("memoryMib 1024");
    expect(shape.message).toContain("512");
    // The same value is allowed (it is what it inherits).
    expect(buildImageGraph([img("base", null, { memoryMib: 512 }), img("c", "base", { memoryMib: 512 })]).spec("c").memoryMib).toBe(512);
    for (const k of ["cmd", "listenerRequired", "guestPort", "pullPolicy", "platform"] as const) {
      const value = { cmd: ["x"], listenerRequired: true, guestPort: 8080, pullPolicy: "always", platform: "linux/amd64" }[k];
      const e = graphError([img("base", null), img("c", "base", { [k]: value })]);
      expect(e.code).toBe("GRAPH_CHILD_OPTION");
      expect(e.message).toContain(k);
    }
  });
});

describe("keys", () => {
  const engine = { qemu: "QEMU emulator version 7.2", machine: "microvm", accel: "tcg" as const, cpu: "max", kernelKey: "k", agentKey: "a", agentVersion: "0.1.0" };
  const g = buildImageGraph([img("base", null), img("child", "base", { warmupTag: "v1" })]);
  const parts = { parentKey: null, manifestDigest: "sha256:aa", workload: null, extraFiles: [], module: { sha256: "m1", packages: {}, files: { "a.ts": "1" } }, engine };

  it("covers every input, and names what changed", () => {
    const base = nodeInputs(g.spec("base"), parts);
    const key = keyOf(base);
    expect(keyOf(nodeInputs(g.spec("base"), { ...parts }))).toBe(key);
    const child = nodeInputs(g.spec("child"), { ...parts, parentKey: key, manifestDigest: null });
    const child2 = nodeInputs(g.spec("child"), { ...parts, parentKey: "other", manifestDigest: null });
    expect(keyOf(child)).not.toBe(keyOf(child2));
    expect(diffInputs({ inputs: child }, { inputs: child2 })).toEqual([{ input: "parent", before: key, after: "other" }]);
    const edited = nodeInputs(g.spec("base"), {
      ...parts,
      extraFiles: [{ guestPath: "/etc/x", mode: 0o644, sha256: "f" }],
      module: { sha256: "m2", packages: { zod: "4.0.0" }, files: { "a.ts": "2", "b.ts": "3" } },
    });
    const changes = diffInputs(
      { inputs: base, sources: { name: "base", ref: "builtin:busybox", module: "a.ts", files: { "a.ts": "1" } } },
      { inputs: edited, sources: { name: "base", ref: "builtin:busybox", module: "a.ts", files: { "a.ts": "2", "b.ts": "3" } } },
    );
    expect(changes.map((c) => c.input)).toEqual(["extraFiles:/etc/x", "module:a.ts", "module:b.ts", "package:zod"]);
  });
});
