// loadProject on valid projects: the README's example, every form of definition and config, every
// kind of module jiti loads, and a reload after an edit.
import { existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { join, sep } from "node:path";
import { describe, expect, it } from "vitest";
import { loadProject } from "../../src/config/loader.js";
import type { LoadedProject } from "../../src/schema/project.js";
import { copyFixture, fixture, writeProject } from "../helpers/config.js";

const image = (p: LoadedProject, name: string) => {
  const found = p.images.find((i) => i.name === name);
  if (!found) throw new Error(`no image ${name} in ${p.images.map((i) => i.name).join(", ")}`);
  return found;
};

function edit(file: string, from: string, to: string): void {
  const text = readFileSync(file, "utf8");
  expect(text).toContain(from);
  writeFileSync(file, text.replace(from, to));
}

describe("loadProject", () => {
  it("loads the example project, found upward from a nested directory", async () => {
    const root = copyFixture("basic");
    expect(existsSync(join(root, "node_modules"))).toBe(false); // supermachine/config comes from the alias
    const p = await loadProject({ cwd: join(root, "sandboxes") });

    expect(p.configPath).toBe(join(root, "supermachine.config.ts"));
    expect(p.root).toBe(root);
    expect(p.images.map((i) => i.name)).toEqual(["agent", "python"]); // glob order: sorted paths

    const python = image(p, "python");
    expect(python.module).toBe(join(root, "sandboxes", "python.ts"));
    expect(python.from).toBeNull();
    // Only what the module set: no defaults (a child inherits memoryMib/vcpus from its parent).
    expect(Object.keys(python.definition).sort()).toEqual(["extraFiles", "memoryMib", "ref", "warmup"]);
    expect(python.definition).toMatchObject({ ref: "python:3-bookworm", memoryMib: 512 });
    expect(python.definition.extraFiles).toEqual([{ hostPath: join(root, "sandboxes", "requirements.lock"), guestPath: "/srv/requirements.lock" }]);
    expect(typeof python.definition.warmup).toBe("function");

    const agent = image(p, "agent");
    expect(agent.from).toBe("python"); // `from: python`, the imported object, mapped back by identity
    expect(agent.definition).not.toHaveProperty("from");
    expect(agent.definition).not.toHaveProperty("memoryMib");
    expect(agent.definition.warmup?.name).toBe("prepare");
    expect(agent.definition.warmupTag).toBe("prepare-v1");

    expect(p.pools).toEqual({ agent: { image: "agent", min: 2, max: 16 } });
    expect(p.snapshotsDir).toBeUndefined();
    expect(p.concurrency).toBeUndefined();
    expect(p.dependencies).toEqual(
      ["lib/prepare.ts", "sandboxes/agent.ts", "sandboxes/python.ts", "supermachine.config.ts"].map((f) => join(root, f)),
    );
  });

  it("gives the same result for the fixture in place (the repository's own package)", async () => {
    const p = await loadProject({ cwd: fixture("basic") });
    expect(p.images.map((i) => [i.name, i.from])).toEqual([
      ["agent", "python"],
      ["python", null],
    ]);
    // supermachine's own modules (what the alias loads) are not the project's dependencies.
    expect(p.dependencies.every((d) => d.startsWith(fixture("basic") + sep))).toBe(true);
  });

  it("evaluates function forms with the environment; top-level await; .mts; a CommonJS helper; name fields", async () => {
    const root = fixture("forms");
    const p = await loadProject({ cwd: root, command: "watch" });
    expect(p.images.map((i) => i.name)).toEqual(["base", "child", "tla-image"]); // types.d.ts skipped
    expect(p.concurrency).toBe(1); // the async config function saw command "watch"
    expect(p.snapshotsDir).toBe(join(root, ".snapshots"));
    expect(p.pools).toEqual({ "child-pool": { image: "child", max: 4 }, _warm: { image: "tla-image", min: 0 } });

    const base = image(p, "base");
    expect(base.definition).toEqual({ ref: "builtin:busybox", vcpus: 2, env: { COMMAND: "watch", ROOT: root } });
    const child = image(p, "child");
    expect(child.module).toBe(join(root, "images", "child.mts"));
    expect(child.from).toBe("base"); // `from: base`, a function form, mapped by identity too
    expect(child.definition.env).toEqual({ HELPER: "from-cjs", DATA: "json-v1" });
    expect(child.definition.extraFiles).toEqual([{ hostPath: "/etc/hostname", guestPath: "/etc/host-hostname", mode: 0o600 }]);
    const tla = image(p, "tla-image");
    expect(tla.module).toBe(join(root, "images", "tla.ts"));
    expect(tla.from).toBe("base");
    expect(tla.definition).toEqual({ name: "tla-image", warmupTag: "tla-v1" });

    expect(p.dependencies).toEqual(
      ["images/base.ts", "images/child.mts", "images/tla.ts", "lib/data.json", "lib/helper.cjs", "supermachine.config.ts"].map((f) => join(root, f)),
    );
    expect((await loadProject({ cwd: root })).concurrency).toBe(2); // default command: "build"
  });

  it("takes images as a record: the key is the name, the config file the module", async () => {
    const root = fixture("record");
    const p = await loadProject({ configFile: join(root, "supermachine.config.ts") });
    expect(p.images.map((i) => [i.name, i.from])).toEqual([
      ["base", null],
      ["child", "base"],
      ["named", "child"],
    ]);
    for (const i of p.images) expect(i.module).toBe(join(root, "supermachine.config.ts"));
    expect(image(p, "base").definition).toEqual({ ref: "alpine:3.20", pullPolicy: "never", cmd: ["sleep", "1000"] });
    expect(image(p, "child").definition).toEqual({ memoryMib: 1024, extraFiles: [{ hostPath: join(root, "files", "a.txt"), guestPath: "/a.txt" }] });
    expect(image(p, "named").definition).toEqual({ name: "named" });
    expect(p.pools).toEqual({ main: { image: "child" } });
    expect(p.snapshotsDir).toBe("/var/tmp/sm-snapshots");
    expect(p.dependencies).toEqual([join(root, "defs", "base.ts"), join(root, "supermachine.config.ts")]);
  });

  it("loads .mts, .mjs and CommonJS .js config files", async () => {
    const mts = await loadProject({ cwd: fixture("ext-mts") });
    expect(mts.configPath).toBe(join(fixture("ext-mts"), "supermachine.config.mts"));
    expect(mts.images).toEqual([{ name: "one", module: mts.configPath, definition: { ref: "builtin:busybox" }, from: null }]);

    const mjs = await loadProject({ cwd: fixture("ext-mjs") });
    expect(mjs.configPath).toBe(join(fixture("ext-mjs"), "supermachine.config.mjs"));
    expect(mjs.concurrency).toBe(3);
    expect(mjs.images).toEqual([{ name: "two", module: join(fixture("ext-mjs"), "images", "two.mjs"), definition: { ref: "builtin:busybox", guestPort: 8080 }, from: null }]);

    const js = await loadProject({ cwd: fixture("ext-js") });
    expect(js.configPath).toBe(join(fixture("ext-js"), "supermachine.config.js"));
    expect(js.images).toEqual([{ name: "three", module: js.configPath, definition: { ref: "builtin:busybox", listenerRequired: true }, from: null }]);
  });

  it("follows a .ts import across workspace packages (a package name linked in node_modules)", async () => {
    const ws = copyFixture("workspace");
    mkdirSync(join(ws, "node_modules", "@acme"), { recursive: true });
    symlinkSync(join("..", "..", "packages", "shared"), join(ws, "node_modules", "@acme", "shared"));
    const p = await loadProject({ cwd: join(ws, "app") });
    expect(p.images).toEqual([
      { name: "svc", module: join(ws, "app", "sandboxes", "svc.ts"), definition: { ref: "builtin:busybox", memoryMib: 768, env: { SHARED: "yes" } }, from: null },
    ]);
    // The shared package's source, by its real path: watch mode sees its edits.
    expect(p.dependencies).toEqual([join(ws, "app", "sandboxes", "svc.ts"), join(ws, "app", "supermachine.config.ts"), join(ws, "packages", "shared", "src", "x.ts")]);
  });

  it("resolves supermachine and supermachine/config to this package; a glob never takes the config file for an image", async () => {
    const root = writeProject({
      "supermachine.config.ts": 'import { defineConfig } from "supermachine/config";\nexport default defineConfig({ images: ["./*.ts"] });\n',
      "main.ts": [
        'import { defineImage } from "supermachine/config";',
        'import { Image } from "supermachine";',
        'export default defineImage({ ref: typeof Image.build === "function" ? "has-image-build" : "no" });',
      ].join("\n"),
    });
    const p = await loadProject({ cwd: root });
    expect(p.images).toEqual([{ name: "main", module: join(root, "main.ts"), definition: { ref: "has-image-build" }, from: null }]);
    expect(p.dependencies).toEqual([join(root, "main.ts"), join(root, "supermachine.config.ts")]);
  });

  it("sees edited files when the project is loaded again", async () => {
    const root = copyFixture("basic");
    const first = await loadProject({ cwd: root });
    expect(image(first, "agent").definition.warmupTag).toBe("prepare-v1");
    edit(join(root, "lib", "prepare.ts"), "prepare-v1", "prepare-v2");
    edit(join(root, "sandboxes", "python.ts"), "memoryMib: 512", "memoryMib: 1024");
    const second = await loadProject({ cwd: root });
    expect(image(second, "agent").definition.warmupTag).toBe("prepare-v2");
    expect(image(second, "python").definition.memoryMib).toBe(1024);
    expect(image(second, "agent").from).toBe("python");
    expect(image(first, "agent").definition.warmupTag).toBe("prepare-v1"); // the first result is untouched
  });

  it("sees edits of CommonJS, JSON and .mjs files too (Node's own caches are not used for project files)", async () => {
    const forms = copyFixture("forms");
    expect(image(await loadProject({ cwd: forms }), "child").definition.env).toEqual({ HELPER: "from-cjs", DATA: "json-v1" });
    edit(join(forms, "lib", "helper.cjs"), '"from-cjs"', '"from-cjs-2"');
    edit(join(forms, "lib", "data.json"), "json-v1", "json-v2");
    expect(image(await loadProject({ cwd: forms }), "child").definition.env).toEqual({ HELPER: "from-cjs-2", DATA: "json-v2" });

    const mjs = copyFixture("ext-mjs");
    expect((await loadProject({ cwd: mjs })).images[0]?.definition.guestPort).toBe(8080);
    edit(join(mjs, "images", "two.mjs"), "8080", "9090");
    edit(join(mjs, "supermachine.config.mjs"), "concurrency: 3", "concurrency: 4");
    const again = await loadProject({ cwd: mjs });
    expect(again.images[0]?.definition.guestPort).toBe(9090);
    expect(again.concurrency).toBe(4);
  });

  it("runs loads started together one after the other, each with its own result", async () => {
    const [a, b] = await Promise.all([loadProject({ cwd: fixture("forms") }), loadProject({ cwd: fixture("record") })]);
    expect(a.images.map((i) => i.name)).toEqual(["base", "child", "tla-image"]);
    expect(b.images.map((i) => i.name)).toEqual(["base", "child", "named"]);
    expect(a.dependencies).toContain(join(fixture("forms"), "lib", "helper.cjs"));
    expect(b.dependencies).not.toContain(join(fixture("forms"), "lib", "helper.cjs"));
  });
});
