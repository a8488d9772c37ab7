// The module session under loadProject: one evaluation per module within a load (identity),
// nothing left in Node's require cache after it, in both of its modes.
import { createRequire } from "node:module";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { openModules } from "../../src/config/modules.js";
import { copyFixture } from "../helpers/config.js";

const requireCache = createRequire(import.meta.url).cache;
const def = (mod: unknown) => (mod as { default: unknown }).default;

describe.each([
  ["jiti's factory, a cache per load", true],
  ["jiti's public API, Node's require cache purged", false],
])("module session (%s)", (_, shared) => {
  it("evaluates a module once per session, and afresh in the next one", async () => {
    const root = copyFixture("forms");
    const session = openModules(join(root, "supermachine.config.ts"), { shared });
    const base = def(await session.import(join(root, "images", "base.ts")));
    const child = def(await session.import(join(root, "images", "child.mts")));
    expect((child as { from: unknown }).from).toBe(base);
    expect(def(await session.import(join(root, "images", "base.ts")))).toBe(base);
    const files = session.close();
    expect(files).toContain(join(root, "images", "base.ts"));
    expect(files).toContain(join(root, "lib", "data.json"));
    expect(Object.keys(requireCache).filter((k) => k.startsWith(root))).toEqual([]);

    const next = openModules(join(root, "supermachine.config.ts"), { shared });
    expect(def(await next.import(join(root, "images", "base.ts")))).not.toBe(base);
    next.close();
  });
});
