// Finding the config file: upward from the working directory, in a fixed order within a
// directory; an explicit path wins; a missing one says where it looked.
import { mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { CONFIG_FILE_NAMES, findConfig } from "../../src/config/discover.js";
import { loadProject } from "../../src/config/loader.js";
import { copyFixture, refused, tempDir, writeProject } from "../helpers/config.js";

const CONFIG = 'export default { images: [] };\n';

describe("findConfig", () => {
  it("finds the config in the directory or the nearest parent holding one", () => {
    const root = copyFixture("basic");
    const deep = join(root, "a", "b", "c");
    mkdirSync(deep, { recursive: true });
    expect(findConfig(deep)).toBe(join(root, "supermachine.config.ts"));
    expect(findConfig(root)).toBe(join(root, "supermachine.config.ts"));
    writeProject({ "a/supermachine.config.mjs": CONFIG }, root);
    expect(findConfig(deep)).toBe(join(root, "a", "supermachine.config.mjs")); // the nearest wins, whatever its extension
  });

  it("prefers .ts, then .mts, .js, .mjs within a directory", () => {
    expect(CONFIG_FILE_NAMES).toEqual(["supermachine.config.ts", "supermachine.config.mts", "supermachine.config.js", "supermachine.config.mjs"]);
    const dir = writeProject(Object.fromEntries(CONFIG_FILE_NAMES.map((n) => [n, CONFIG])));
    for (const name of CONFIG_FILE_NAMES) {
      expect(findConfig(dir)).toBe(join(dir, name));
      rmSync(join(dir, name));
    }
    expect(findConfig(dir)).toBeUndefined();
  });

  it("ignores a directory named like a config file", () => {
    const dir = tempDir();
    mkdirSync(join(dir, "supermachine.config.ts"));
    expect(findConfig(dir)).toBeUndefined();
  });
});

describe("loadProject's config file", () => {
  it("takes an explicit configFile (relative to cwd, or a directory) over the one found", async () => {
    const root = copyFixture("basic");
    writeProject({ "other/my.config.ts": 'import { defineConfig } from "supermachine/config";\nexport default defineConfig({ images: [], concurrency: 7 });\n' }, root);
    const p = await loadProject({ cwd: root, configFile: "other/my.config.ts" });
    expect(p.configPath).toBe(join(root, "other", "my.config.ts"));
    expect(p.root).toBe(join(root, "other"));
    expect(p.images).toEqual([]);
    expect(p.concurrency).toBe(7);
    const byDir = await loadProject({ cwd: join(root, "sandboxes"), configFile: ".." });
    expect(byDir.configPath).toBe(join(root, "supermachine.config.ts"));
  });

  it("refuses a configFile that does not exist, naming it", async () => {
    const root = copyFixture("basic");
    const e = await refused(loadProject({ cwd: root, configFile: "nope.config.ts" }));
    expect(e.code).toBe("CONFIG_NOT_FOUND");
    expect(e.message).toBe(`config file ${join(root, "nope.config.ts")} does not exist`);
    expect(e.file).toBe(join(root, "nope.config.ts"));
    expect(e.hint).toContain("--config");
    const dir = await refused(loadProject({ cwd: root, configFile: "lib" }));
    expect(dir.code).toBe("CONFIG_NOT_FOUND");
    expect(dir.message).toContain(join(root, "lib"));
  });

  it("says where it looked when there is no config, and how to make one", async () => {
    const dir = tempDir();
    const e = await refused(loadProject({ cwd: dir }));
    expect(e.code).toBe("CONFIG_NOT_FOUND");
    expect(e.message).toBe(`no supermachine.config.{ts,mts,js,mjs} in ${dir} or any parent directory`);
    expect(e.hint).toContain("create supermachine.config.ts");
    expect(e.hint).toContain("--config");
  });
});
