// Every refusal of loadProject: a stable code, a message naming the file (relative to the
// config's directory), the image and the field, a hint with the accepted values.
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { loadProject } from "../../src/config/loader.js";
import { refused, writeProject } from "../helpers/config.js";

const HEAD = 'import { defineConfig, defineImage } from "supermachine/config";\n';
const GLOB_CONFIG = `${HEAD}export default defineConfig({ images: ["./sandboxes/*.ts"] });\n`;

/** A project of image modules (sandboxes/<name>.ts → source of its definition) and a config. */
function project(images: Record<string, string>, config = GLOB_CONFIG, extra: Record<string, string> = {}): string {
  return writeProject({
    "supermachine.config.ts": config,
    ...Object.fromEntries(Object.entries(images).map(([name, def]) => [`sandboxes/${name}.ts`, `${HEAD}export default defineImage(${def});\n`])),
    ...extra,
  });
}

/** A project whose config is `defineConfig(<cfg>)`, with one valid image module. */
function configProject(cfg: string): string {
  return project({ base: '{ ref: "builtin:busybox" }' }, `${HEAD}export default defineConfig(${cfg});\n`);
}

const load = (root: string) => loadProject({ cwd: root });

describe("invalid values in an image", () => {
  it("memoryMib as a string", async () => {
    const root = project({ py: '{ ref: "python:3", memoryMib: "512" as any }' });
    const e = await refused(load(root));
    expect(e.code).toBe("OPTION_INVALID");
    expect(e.message).toBe('sandboxes/py.ts: image "py": memoryMib must be an integer from 64 to 1048576, got "512"');
    expect(e.file).toBe(join(root, "sandboxes", "py.ts"));
    expect(e.image).toBe("py");
  });

  it("an unknown pullPolicy, with the accepted values", async () => {
    const e = await refused(load(project({ py: '{ ref: "python:3", pullPolicy: "sometimes" as any }' })));
    expect(e.code).toBe("OPTION_INVALID");
    expect(e.message).toMatch(/^sandboxes\/py\.ts: image "py": pullPolicy .*got "sometimes"$/);
    expect(e.hint).toBe('accepted values: "always", "missing", "never"');
  });

  it("a relative guestPath in extraFiles", async () => {
    const e = await refused(load(project({ py: '{ ref: "python:3", extraFiles: [{ hostPath: "a", guestPath: "srv/a" }] }' })));
    expect(e.code).toBe("OPTION_INVALID");
    expect(e.message).toBe('sandboxes/py.ts: image "py": extraFiles[0].guestPath must be an absolute, normalised guest path (like /srv/app/config.toml: no \'..\', \'.\', \'//\' or trailing \'/\'), got "srv/a"');
  });

  it("the same guestPath twice", async () => {
    const e = await refused(load(project({ py: '{ ref: "python:3", extraFiles: [{ hostPath: "a", guestPath: "/a" }, { hostPath: "b", guestPath: "/a" }] }' })));
    expect(e.message).toBe('sandboxes/py.ts: image "py": extraFiles[1].guestPath appears twice in extraFiles, got "/a"');
  });

  it("an unknown key, with the accepted ones", async () => {
    const e = await refused(load(project({ py: '{ ref: "python:3", memoryMB: 512 } as any' })));
    expect(e.code).toBe("OPTION_UNKNOWN");
    expect(e.message).toBe('sandboxes/py.ts: image "py": unknown option "memoryMB"');
    expect(e.hint).toContain('"memoryMib"');
    expect(e.hint).toContain('"from"');
    expect(e.hint).toContain('"warmup"');
  });

  it("both ref and from", async () => {
    const root = project({ base: '{ ref: "builtin:busybox" }', child: '{ ref: "alpine:3.20", from: "base" } as any' });
    const e = await refused(load(root));
    expect(e.code).toBe("OPTION_INVALID");
    expect(e.message).toBe('sandboxes/child.ts: image "child": from cannot be combined with ref (an image starts either from an image reference or from another image of the project), got "base"');
    expect(e.image).toBe("child");
    expect(e.hint).toContain("keep ref");
  });

  it("neither ref nor from", async () => {
    const e = await refused(load(project({ lonely: "{ memoryMib: 512 } as any" })));
    expect(e.code).toBe("OPTION_MISSING");
    expect(e.message).toBe('sandboxes/lonely.ts: image "lonely": ref is required when there is no from, and it is missing');
    expect(e.hint).toContain("from:");
  });

  it("from an OCI reference instead of an image name", async () => {
    const e = await refused(load(project({ child: '{ from: "python:3" }' })));
    expect(e.code).toBe("OPTION_INVALID");
    expect(e.message).toMatch(/^sandboxes\/child\.ts: image "child": from must be the name of an image of this project.*got "python:3"$/);
    expect(e.hint).toContain("use ref");
  });

  it("names the image by its name field, and a record entry by its key, in the config file", async () => {
    const named = await refused(load(project({ file: '{ name: "svc", ref: "x", vcpus: 0 }' })));
    expect(named.message).toBe('sandboxes/file.ts: image "svc": vcpus must be an integer from 1 to 255, got 0');
    const record = await refused(load(configProject('{ images: { web: defineImage({ ref: "x", guestPort: 70000 }) } }')));
    expect(record.message).toBe('supermachine.config.ts: image "web": guestPort must be an integer from 1 to 65535, got 70000');
    expect(record.image).toBe("web");
  });
});

describe("invalid config", () => {
  it("an unknown key, with the accepted ones", async () => {
    const root = configProject('{ images: ["./sandboxes/*.ts"], pool: {} } as any');
    const e = await refused(load(root));
    expect(e.code).toBe("OPTION_UNKNOWN");
    expect(e.message).toBe('supermachine.config.ts: unknown option "pool"');
    expect(e.hint).toBe('accepted options: "images", "pools", "snapshotsDir", "concurrency", "cache"');
    expect(e.file).toBe(join(root, "supermachine.config.ts"));
    expect(e.image).toBeUndefined();
  });

  it("an unknown key in a pool", async () => {
    const e = await refused(load(configProject('{ images: ["./sandboxes/*.ts"], pools: { a: { image: "base", maxVms: 3 } } } as any')));
    expect(e.code).toBe("OPTION_UNKNOWN");
    expect(e.message).toBe('supermachine.config.ts: unknown option "maxVms" in pools.a');
    expect(e.hint).toContain('"image"');
    expect(e.hint).toContain('"max"');
  });

  it("a pool's image that is not a name", async () => {
    const e = await refused(load(configProject('{ images: ["./sandboxes/*.ts"], pools: { agent: { image: 3 } } } as any')));
    expect(e.code).toBe("OPTION_INVALID");
    expect(e.message).toBe("supermachine.config.ts: pools.agent.image must be the name of an image of the project (a string), got 3");
    const missing = await refused(load(configProject('{ images: ["./sandboxes/*.ts"], pools: { agent: { min: 1 } } } as any')));
    expect(missing.code).toBe("OPTION_MISSING");
    expect(missing.message).toContain("pools.agent.image must be the name of an image");
  });

  it("a pool whose min is above its max", async () => {
    const e = await refused(load(configProject('{ images: ["./sandboxes/*.ts"], pools: { agent: { image: "base", min: 3, max: 2 } } }')));
    expect(e.message).toBe("supermachine.config.ts: pools.agent.min is larger than max (2), got 3");
  });

  it("pool names that would shadow a member of the pools object, or are not identifiers", async () => {
    for (const name of ["close", "then", "constructor", "toString", "hasOwnProperty"]) {
      const e = await refused(load(configProject(`{ images: ["./sandboxes/*.ts"], pools: { ${name}: { image: "base" } } }`)));
      expect(e.code).toBe("OPTION_INVALID");
      expect(e.message).toBe(`supermachine.config.ts: key of pools is a reserved name: it would shadow a member of the pools object, got "${name}"`);
      expect(e.hint).toContain("close");
      expect(e.hint).toContain("then");
    }
    // "__proto__" would silently declare no pool: a literal key sets the prototype, a computed
    // one is dropped by the record schema.
    const computed = await refused(load(configProject('{ images: ["./sandboxes/*.ts"], pools: { ["__proto__"]: { image: "base" } } }')));
    expect(computed.code).toBe("OPTION_INVALID");
    expect(computed.message).toBe('supermachine.config.ts: key of pools cannot be "__proto__"');
    const literal = await refused(load(configProject('{ images: ["./sandboxes/*.ts"], pools: { __proto__: { image: "base" } } as any }')));
    expect(literal.message).toMatch(/^supermachine\.config\.ts: pools must be an object literal, got /);
    expect(literal.hint).toContain('"__proto__"');
    const image = await refused(load(configProject('{ images: { ["__proto__"]: defineImage({ ref: "x" }) } }')));
    expect(image.message).toBe('supermachine.config.ts: key of images cannot be "__proto__"');
    const bad = await refused(load(configProject('{ images: ["./sandboxes/*.ts"], pools: { "my pool": { image: "base" } } }')));
    expect(bad.message).toBe('supermachine.config.ts: key of pools must match [A-Za-z_][A-Za-z0-9_-]*, got "my pool"');
  });

  it("images of the wrong shape", async () => {
    const e = await refused(load(configProject('{ images: "./sandboxes/*.ts" } as any')));
    expect(e.code).toBe("OPTION_INVALID");
    expect(e.message).toBe('supermachine.config.ts: images must be an array of glob patterns of image modules, or a record of image name → definition, got "./sandboxes/*.ts"');
    const missing = await refused(load(configProject("{} as any")));
    expect(missing.code).toBe("OPTION_MISSING");
    const entry = await refused(load(configProject('{ images: ["./sandboxes/*.ts", 3] } as any')));
    expect(entry.message).toBe("supermachine.config.ts: images[1] must be a glob pattern of image modules (a string), got 3");
    const value = await refused(load(configProject("{ images: { web: 42 } } as any")));
    expect(value.message).toBe("supermachine.config.ts: images.web must be an image definition: defineImage({ ... }) or a function returning one, got 42");
  });

  it("globs that match no module", async () => {
    const e = await refused(load(configProject('{ images: ["./sandbox/*.ts"] }')));
    expect(e.code).toBe("CONFIG_NO_IMAGES");
    expect(e.message).toMatch(/^supermachine\.config\.ts: images \["\.\/sandbox\/\*\.ts"\] match no module in /);
  });

  it("a glob that matches a file that is not a module", async () => {
    const root = project({ base: '{ ref: "x" }' }, `${HEAD}export default defineConfig({ images: ["./sandboxes/*"] });\n`, { "sandboxes/README.md": "# images\n" });
    const e = await refused(load(root));
    expect(e.code).toBe("CONFIG_INVALID_MODULE");
    expect(e.message).toMatch(/^sandboxes\/README\.md: matched by images \["\.\/sandboxes\/\*"\], but is not a module/);
  });
});

describe("names", () => {
  it("the same name twice, naming both files", async () => {
    const root = project({ a: '{ name: "py", ref: "python:3" }', b: '{ name: "py", ref: "python:3.12" }' });
    const e = await refused(load(root));
    expect(e.code).toBe("CONFIG_DUPLICATE_IMAGE");
    expect(e.message).toBe('image "py" is declared twice: in sandboxes/a.ts and in sandboxes/b.ts');
    expect(e.file).toBe(join(root, "sandboxes", "b.ts"));
    expect(e.hint).toContain("name:");
  });

  it("one definition exported by two modules", async () => {
    const root = project({ a: '{ ref: "python:3" }' }, GLOB_CONFIG, { "sandboxes/b.ts": 'export { default } from "./a";\n' });
    const e = await refused(load(root));
    expect(e.code).toBe("CONFIG_DUPLICATE_IMAGE");
    expect(e.message).toBe('sandboxes/b.ts: image "b" is the same definition as image "a" (sandboxes/a.ts)');
  });

  it("a record key and a different name field", async () => {
    const e = await refused(load(configProject('{ images: { web: defineImage({ name: "www", ref: "x" }) } }')));
    expect(e.code).toBe("CONFIG_NAME_MISMATCH");
    expect(e.message).toBe('supermachine.config.ts: image "web": name "www" differs from its key in images');
  });

  it("a module file name that is not a valid image name", async () => {
    const root = writeProject({ "supermachine.config.ts": GLOB_CONFIG, "sandboxes/my image.ts": `${HEAD}export default defineImage({ ref: "x" });\n` });
    const e = await refused(load(root));
    expect(e.code).toBe("CONFIG_INVALID_NAME");
    expect(e.message).toMatch(/^sandboxes\/my image\.ts: the file name gives the image name "my image", which is not a valid name/);
    expect(e.hint).toContain("name:");
  });

  it("a record key that is not a valid image name", async () => {
    const e = await refused(load(configProject('{ images: { "a b": defineImage({ ref: "x" }) } }')));
    expect(e.code).toBe("OPTION_INVALID");
    expect(e.message).toMatch(/^supermachine\.config\.ts: key of images is not a valid image name.*got "a b"$/);
  });
});

describe("from", () => {
  it("a definition object that is not one of the project's images", async () => {
    // agent imports lib/base.ts, which no glob lists.
    const root = project({}, GLOB_CONFIG, {
      "lib/base.ts": `${HEAD}export default defineImage({ ref: "python:3" });\n`,
      "sandboxes/agent.ts": `${HEAD}import base from "../lib/base";\nexport default defineImage({ from: base, warmupTag: "x" });\n`,
    });
    const e = await refused(load(root));
    expect(e.code).toBe("CONFIG_UNKNOWN_FROM");
    expect(e.message).toBe('sandboxes/agent.ts: image "agent": from is a definition that is not one of the project\'s images, got {"ref":"python:3"}');
    expect(e.image).toBe("agent");
    expect(e.hint).toContain("import the parent module's default export");
    expect(e.hint).toContain('["./sandboxes/*.ts"]');
  });

  it("leaves an unknown image name to the graph layer", async () => {
    const p = await load(project({ child: '{ from: "nowhere" }' }));
    expect(p.images).toEqual([expect.objectContaining({ name: "child", from: "nowhere", definition: {} })]);
  });
});

describe("modules", () => {
  it("a module that throws while loading, with the cause", async () => {
    const root = project({ base: '{ ref: "x" }' }, GLOB_CONFIG, {
      "sandboxes/broken.ts": `${HEAD}import { value } from "../lib/throws";\nexport default defineImage({ ref: value });\n`,
      "lib/throws.ts": 'throw new Error("no registry credentials");\nexport const value = "x";\n',
    });
    const e = await refused(load(root));
    expect(e.code).toBe("CONFIG_LOAD_FAILED");
    expect(e.message).toBe("sandboxes/broken.ts: failed to load: no registry credentials");
    expect(e.file).toBe(join(root, "sandboxes", "broken.ts"));
    expect((e.cause as Error).message).toBe("no registry credentials");
  });

  it("a config that throws, and one with a syntax error", async () => {
    const throws = await refused(load(writeProject({ "supermachine.config.ts": 'throw new TypeError("bad env");\n' })));
    expect(throws.code).toBe("CONFIG_LOAD_FAILED");
    expect(throws.message).toBe("supermachine.config.ts: failed to load: bad env");
    const syntax = await refused(load(project({ base: '{ ref: "x" }' }, GLOB_CONFIG, { "sandboxes/typo.ts": "export default defineImage({ ref: \n" })));
    expect(syntax.code).toBe("CONFIG_LOAD_FAILED");
    expect(syntax.message).toMatch(/^sandboxes\/typo\.ts: failed to load: /);
  });

  it("a function form that throws", async () => {
    const e = await refused(load(project({ fn: '() => { throw new Error("no env"); }' })));
    expect(e.code).toBe("CONFIG_LOAD_FAILED");
    expect(e.message).toBe('sandboxes/fn.ts: image "fn": the definition function threw: no env');
    const cfg = await refused(load(writeProject({ "supermachine.config.ts": `${HEAD}export default defineConfig(async () => { throw new Error("later"); });\n` })));
    expect(cfg.message).toBe("supermachine.config.ts: the config function threw: later");
  });

  it("a function form that returns something else than a definition", async () => {
    const e = await refused(load(project({ fn: "(() => 42) as any" })));
    expect(e.code).toBe("CONFIG_INVALID_MODULE");
    expect(e.message).toBe('sandboxes/fn.ts: image "fn": the definition function returned 42, not an image definition');
  });

  it("a module without a default export", async () => {
    const root = project({ base: '{ ref: "x" }' }, GLOB_CONFIG, { "sandboxes/named.ts": `${HEAD}export const image = defineImage({ ref: "x" });\n` });
    const e = await refused(load(root));
    expect(e.code).toBe("CONFIG_INVALID_MODULE");
    expect(e.message).toBe("sandboxes/named.ts: has no default export");
    expect(e.hint).toContain("export default defineImage(");
    const cfg = await refused(load(writeProject({ "supermachine.config.ts": "export const images = [];\n" })));
    expect(cfg.code).toBe("CONFIG_INVALID_MODULE");
    expect(cfg.message).toBe("supermachine.config.ts: has no default export");
    expect(cfg.hint).toContain("defineConfig(");
  });

  it("a default export that is not a definition", async () => {
    const root = project({}, GLOB_CONFIG, { "sandboxes/list.ts": 'export default ["python:3"];\n' });
    const e = await refused(load(root));
    expect(e.code).toBe("CONFIG_INVALID_MODULE");
    expect(e.message).toBe('sandboxes/list.ts: the default export must be an image definition (an object, or a function returning one), got ["python:3"]');
    const cfg = await refused(load(writeProject({ "supermachine.config.ts": 'export default "images";\n' })));
    expect(cfg.code).toBe("CONFIG_INVALID_MODULE");
    expect(cfg.message).toBe('supermachine.config.ts: the default export must be a config (an object, or a function returning one), got "images"');
  });
});
