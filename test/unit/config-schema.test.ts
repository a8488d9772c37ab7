// The config schemas (src/schema/config.ts): the option table's fields and messages; defaults
// are applied once, where options are resolved (the graph, image.pool).
import { describe, expect, it } from "vitest";
import { configSchema, imageDefinitionSchema, poolDeclarationSchema, RESERVED_POOL_NAMES } from "../../src/schema/config.js";
import { buildSchema, poolSchema } from "../../src/schema/options.js";
import { parseOptions } from "../../src/schema/parse.js";
import { buildImageGraph } from "../../src/graph/graph.js";

/** An Image.build definition as the graph resolves it (defaults applied once, there). */
const resolved = (definition: object) => buildImageGraph([{ name: "a", module: null, from: null, definition: buildSchema.parse(definition) }]).spec("a");
import { OptionError } from "../../src/errors.js";

function message(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(OptionError);
    return (e as OptionError).message;
  }
  throw new Error("expected an OptionError");
}

describe("image definition schema", () => {
  it("applies no default: a child inherits memoryMib and vcpus from its parent", () => {
    expect(imageDefinitionSchema.parse({ from: "python" })).toEqual({ from: "python" });
    expect(imageDefinitionSchema.parse({ ref: " alpine " })).toEqual({ ref: "alpine" });
    // Nor does Image.build's schema, the same fields: the graph fills them, for both.
    expect(buildSchema.parse({ ref: "alpine" })).toEqual({ ref: "alpine" });
    expect(resolved({ ref: "alpine" })).toMatchObject({ memoryMib: 256, vcpus: 1, pullPolicy: "missing", env: {}, extraFiles: [], network: "none" });
  });

  it("accepts and refuses what Image.build does, with the same messages", () => {
    for (const bad of [{ memoryMib: 32 }, { vcpus: 1.5 }, { env: { "A=B": "x" } }, { cmd: [] }, { platform: "amd64" }, { guestPort: 0 }]) {
      const asBuild = message(() => parseOptions("x", buildSchema, { ref: "alpine", ...bad }));
      expect(message(() => parseOptions("x", imageDefinitionSchema, { ref: "alpine", ...bad }))).toBe(asBuild);
    }
  });
});

describe("pool declaration schema", () => {
  it("takes image.pool's options and an image name, without defaults", () => {
    expect(poolDeclarationSchema.parse({ image: "agent" })).toEqual({ image: "agent" });
    expect(poolDeclarationSchema.parse({ image: "agent", min: 2, max: 16, memoryMib: 1024 })).toEqual({ image: "agent", min: 2, max: 16, memoryMib: 1024 });
    expect(poolSchema.parse({ min: 2 })).toMatchObject({ min: 2, max: 2, acquireTimeoutMs: 60_000 });
    // image.pool's cross-field check (min <= max), on what was set: max defaults to min.
    expect(poolDeclarationSchema.parse({ image: "a", min: 5 })).toEqual({ image: "a", min: 5 });
    expect(message(() => parseOptions("c", poolDeclarationSchema, { image: "a", min: 5, max: 2 }))).toBe(message(() => parseOptions("c", poolSchema, { min: 5, max: 2 })));
  });

  it("refuses the names of the pools object's members", () => {
    for (const n of ["close", "then", "constructor", "toString", "__proto__", "hasOwnProperty", "valueOf"]) expect(RESERVED_POOL_NAMES).toContain(n);
    expect(configSchema.safeParse({ images: [], pools: { then: { image: "a" } } }).success).toBe(false);
    expect(configSchema.safeParse({ images: [], pools: { _then: { image: "a" }, "agent-2": { image: "a" } } }).success).toBe(true);
  });
});

describe("network in definitions and pools", () => {
  it("keeps what the user wrote in a declaration, resolves it in Image.build and image.pool, and refuses the same values with the same messages", () => {
    const network = { allow: ["PyPI.org", "*.example.com:8443"], hosts: { "index.test": "127.0.0.1" } };
    expect(imageDefinitionSchema.parse({ ref: "alpine", network })).toEqual({ ref: "alpine", network });
    expect(poolDeclarationSchema.parse({ image: "a", network: "none" })).toEqual({ image: "a", network: "none" });
    expect(buildSchema.parse({ ref: "alpine", network }).network).toEqual(network);
    expect(resolved({ ref: "alpine", network }).network).toMatchObject({ allow: [{ text: "*.example.com:8443" }, { text: "pypi.org" }], hosts: { "index.test": "127.0.0.1" }, maxConnections: 32 });
    expect(poolSchema.parse({}).network).toBe("none");
    for (const bad of [{ allow: ["http://x.test/"] }, { allow: "x.test" }, { allow: [], hosts: { a: "not-an-ip" } }, { allow: ["x.test"], maxConnections: 0 }, "all"]) {
      const asBuild = message(() => parseOptions("x", buildSchema, { ref: "alpine", network: bad }));
      expect(asBuild).toMatch(/network/);
      expect(message(() => parseOptions("x", imageDefinitionSchema, { ref: "alpine", network: bad }))).toBe(asBuild);
      expect(message(() => parseOptions("x", poolDeclarationSchema, { image: "a", network: bad }))).toBe(message(() => parseOptions("x", poolSchema, { network: bad })));
    }
  });
});

