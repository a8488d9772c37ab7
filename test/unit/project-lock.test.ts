// supermachine.lock (src/project/lock.ts): the file's format, validation of untrusted content
// (each refusal names the file and the entry), writes only on change, and concurrent writers,
// in one process and in several, that each add a pin and keep all of them. Real files, real
// child processes; no registry (build --update and resolving by a pin are in test/vm/lockfile).
import { spawn, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { ConfigError } from "../../src/config/errors.js";
import { BuildError } from "../../src/errors.js";
import { buildImageGraph } from "../../src/graph/graph.js";
import { diffInputs } from "../../src/graph/keys.js";
import { formatLock, LOCK_FILE, MAX_LOCK_BYTES, ProjectLock, requirePins, updatePins, type Pin } from "../../src/project/lock.js";
import type { SnapshotInputs, SnapshotSources } from "../../src/schema/key.js";

const repo = join(import.meta.dirname, "..", "..");
const D = (c: string) => `sha256:${c.repeat(64)}`;
const pin = (ref: string, digest: string, platform = "linux/amd64"): Pin => ({ ref, platform, digest, resolved: canonical(ref) });
const canonical = (ref: string) => (ref.includes("/") && ref.split("/")[0]!.includes(".") ? ref : `docker.io/library/${ref}`).replace(/^([^:]*)$/, "$1:latest");

let dir: string;
let file: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "sm-lock-"));
  file = join(dir, LOCK_FILE);
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function refused(text: string | (() => Promise<void>)): Promise<ConfigError> {
  if (typeof text === "string") await writeFile(file, text);
  else await text();
  try {
    await ProjectLock.open(dir);
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    expect((e as ConfigError).file).toBe(file);
    expect((e as ConfigError).message).toContain(file);
    expect((e as ConfigError).hint).toBeTruthy();
    return e as ConfigError;
  }
  throw new Error("expected the lockfile to be refused");
}

const doc = (pins: unknown[], extra: Record<string, unknown> = {}) => JSON.stringify({ version: 1, pins, ...extra });

describe("supermachine.lock", () => {
  it("is written sorted, with fixed key order, and read back as written", async () => {
    const lock = await ProjectLock.open(dir);
    expect(lock.entries).toEqual([]);
    expect(await lock.save()).toEqual([]); // nothing to write: no file appears
    expect(existsSync(file)).toBe(false);
    lock.record(pin("python:3-bookworm", D("b"), "linux/arm64"));
    lock.record(pin("python:3-bookworm", D("a")));
    lock.record(pin("127.0.0.1:5000/team/base:1", D("c")));
    const changes = await lock.save();
    expect(changes.map((c) => [c.change, c.ref, c.platform])).toEqual([
      ["pinned", "python:3-bookworm", "linux/arm64"],
      ["pinned", "python:3-bookworm", "linux/amd64"],
      ["pinned", "127.0.0.1:5000/team/base:1", "linux/amd64"],
    ]);
    const text = await readFile(file, "utf8");
    expect(text).toBe(
      `{
  "version": 1,
  "pins": [
    {
      "ref": "127.0.0.1:5000/team/base:1",
      "platform": "linux/amd64",
      "digest": "${D("c")}",
      "resolved": "127.0.0.1:5000/team/base:1"
    },
    {
      "ref": "python:3-bookworm",
      "platform": "linux/amd64",
      "digest": "${D("a")}",
      "resolved": "docker.io/library/python:3-bookworm"
    },
    {
      "ref": "python:3-bookworm",
      "platform": "linux/arm64",
      "digest": "${D("b")}",
      "resolved": "docker.io/library/python:3-bookworm"
    }
  ]
}
`,
    );
    expect(formatLock([...lock.entries].reverse())).toBe(text);
    const again = await ProjectLock.open(dir);
    expect(again.get("python:3-bookworm", "linux/amd64")).toBe(D("a"));
    expect(again.get("python:3-bookworm", "linux/arm64")).toBe(D("b"));
    expect(again.get("python:3-bookworm", "linux/riscv64")).toBeUndefined();
    expect(again.get("python:3", "linux/amd64")).toBeUndefined();
    // No temp or lock file is left beside it.
    expect((await readdir(dir)).sort()).toEqual([LOCK_FILE]);
  });

  it("is rewritten only when a pin changes; a recorded pin never replaces one, set does", async () => {
    const first = await ProjectLock.open(dir);
    first.record(pin("python:3-bookworm", D("a")));
    await first.save();
    const before = await stat(file);
    await new Promise((r) => setTimeout(r, 20));
    const second = await ProjectLock.open(dir);
    second.record(pin("python:3-bookworm", D("f"))); // pinned already: the pin wins
    expect(second.get("python:3-bookworm", "linux/amd64")).toBe(D("a"));
    expect(await second.save()).toEqual([]);
    second.set(pin("python:3-bookworm", D("a"))); // the same digest: no change
    expect(await second.save()).toEqual([]);
    const after = await stat(file);
    expect(after.mtimeMs).toBe(before.mtimeMs);
    expect(after.ino).toBe(before.ino);

    second.set(pin("python:3-bookworm", D("e")));
    expect(second.get("python:3-bookworm", "linux/amd64")).toBe(D("e"));
    const moved = await second.save();
    expect(moved).toEqual([{ ...pin("python:3-bookworm", D("e")), change: "moved", before: D("a") }]);
    expect(second.written).toEqual(moved);
    expect((await ProjectLock.open(dir)).get("python:3-bookworm", "linux/amd64")).toBe(D("e"));

    second.drop("python:3-bookworm", "linux/amd64");
    expect(second.get("python:3-bookworm", "linux/amd64")).toBeUndefined();
    expect((await second.save()).map((c) => c.change)).toEqual(["dropped"]);
    expect(JSON.parse(await readFile(file, "utf8"))).toEqual({ version: 1, pins: [] });
  });

  it("keeps every pin when writers in one process save at once, each from what it read", async () => {
    const locks = await Promise.all(Array.from({ length: 6 }, () => ProjectLock.open(dir)));
    locks.forEach((l, i) => l.record(pin(`img${i}:1`, D(String(i)))));
    await Promise.all(locks.map((l) => l.save()));
    const merged = await ProjectLock.open(dir);
    expect(merged.entries.map((p) => p.ref)).toEqual(["img0:1", "img1:1", "img2:1", "img3:1", "img4:1", "img5:1"]);
  });

  it("keeps every pin when processes write at once", async () => {
    const n = 5;
    const go = join(dir, "go");
    // Each child reads the (empty) lockfile, records its pin, waits for the others, and saves.
    const code = `
      const { createJiti } = require("jiti");
      const { existsSync } = require("node:fs");
      const jiti = createJiti(${JSON.stringify(repo + "/")});
      (async () => {
        const { ProjectLock } = await jiti.import("./src/project/lock.ts");
        const [dir, i] = process.argv.slice(1);
        const lock = await ProjectLock.open(dir);
        lock.record({ ref: "img" + i + ":1", platform: "linux/amd64", digest: "sha256:" + i.repeat(64), resolved: "docker.io/library/img" + i + ":1" });
        process.stdout.write("ready\\n");
        while (!existsSync(${JSON.stringify(go)})) await new Promise((r) => setTimeout(r, 2));
        const changes = await lock.save();
        process.stdout.write(JSON.stringify(changes.map((c) => c.ref)) + "\\n");
      })().catch((e) => { console.error(e); process.exit(1); });
    `;
    const children = Array.from({ length: n }, (_, i) => {
      const c = spawn(process.execPath, ["-e", code, dir, String(i)], { stdio: ["ignore", "pipe", "inherit"] });
      let out = "";
      c.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
      const ready = new Promise<void>((resolve) => {
        const check = () => (out.includes("ready") ? resolve() : setTimeout(check, 5));
        check();
      });
      const done = new Promise<{ status: number | null; out: string }>((resolve) => c.on("close", (status) => resolve({ status, out })));
      return { ready, done };
    });
    await Promise.all(children.map((c) => c.ready));
    await writeFile(go, "");
    const results = await Promise.all(children.map((c) => c.done));
    for (const r of results) expect(r.status).toBe(0);
    // Each wrote its own pin (none found it there already), and the file has all of them.
    expect(results.map((r) => JSON.parse(r.out.split("\n")[1]!) as string[]).flat().sort()).toEqual(Array.from({ length: n }, (_, i) => `img${i}:1`));
    const merged = await ProjectLock.open(dir);
    expect(merged.entries.map((p) => p.ref)).toEqual(Array.from({ length: n }, (_, i) => `img${i}:1`));
    expect((await readdir(dir)).sort()).toEqual(["go", LOCK_FILE]);
  }, 60_000);

  describe("refuses, naming the file and the entry", () => {
    const good = pin("python:3-bookworm", D("a"));
    it.each<[string, string, RegExp]>([
      ["not JSON", "{ version: 1", /is not valid JSON/],
      ["an array", "[]", /must be a JSON object/],
      ["an unknown field", doc([], { extra: 1 }), /unknown field "extra"/],
      ["no version", JSON.stringify({ pins: [] }), /version null is not one this version of supermachine reads/],
      ["a newer version", doc([], { version: 2 }), /version 2 is not one/],
      ["pins not a list", JSON.stringify({ version: 1, pins: {} }), /pins must be an array/],
      ["a bad digest", doc([{ ...good, digest: "sha256:abc" }]), /pins\[0\] \(python:3-bookworm, linux\/amd64\): digest must be sha256:<64 hex digits>/],
      ["a bad platform", doc([good, { ...good, platform: "amd64" }]), /pins\[1\] \(python:3-bookworm, amd64\): platform must be os\/arch/],
      ["a missing field", doc([{ ref: "x:1", platform: "linux/amd64", digest: D("a") }]), /pins\[0\] \(x:1, linux\/amd64\): resolved/],
      ["an unknown entry field", doc([{ ...good, note: "hi" }]), /pins\[0\] \(python:3-bookworm, linux\/amd64\): has unknown field "note"/],
      ["an entry that is no object", doc([7]), /pins\[0\]: the entry/],
      ["a digest reference", doc([{ ...good, ref: `python@${D("a")}`, resolved: `docker.io/library/python@${D("a")}` }]), /is not a registry reference with a tag/],
      ["a local reference", doc([{ ...good, ref: "builtin:busybox", resolved: "builtin:busybox" }]), /pins\[0\] \(builtin:busybox, linux\/amd64\): ref "builtin:busybox" is not a registry reference with a tag/],
      ["a resolved name of another ref", doc([{ ...good, resolved: "docker.io/library/node:20" }]), /resolved "docker.io\/library\/node:20" is not the name ref "python:3-bookworm" stands for \(docker.io\/library\/python:3-bookworm\)/],
      ["a pin given twice", doc([good, { ...good, digest: D("b") }]), /pins\[1\] \(python:3-bookworm, linux\/amd64\): python:3-bookworm is pinned twice for linux\/amd64/],
    ])("%s", async (_what, text, message) => {
      const err = await refused(text);
      expect(err.code).toBe("CONFIG_LOCK_INVALID");
      expect(err.message).toMatch(message);
    });

    it("more than the size limit, without reading it", async () => {
      const err = await refused(doc([good]) + " ".repeat(MAX_LOCK_BYTES));
      expect(err.message).toMatch(/more than the 1048576-byte limit/);
    });

    it("a FIFO, without blocking", async () => {
      const err = await refused(async () => {
        expect(spawnSync("mkfifo", [file]).status).toBe(0);
      });
      expect(err.message).toMatch(/is not a regular file/);
    });

    it("a directory", async () => {
      const err = await refused(() => import("node:fs/promises").then((fs) => fs.mkdir(file)));
      expect(err.message).toMatch(/is not a regular file/);
    });

    it("a symlink to nowhere reads as no lockfile; to a file, as that file", async () => {
      await symlink(join(dir, "nowhere"), file);
      expect((await ProjectLock.open(dir)).entries).toEqual([]);
      await rm(file);
      await writeFile(join(dir, "real"), doc([good]));
      await symlink(join(dir, "real"), file);
      expect((await ProjectLock.open(dir)).entries).toEqual([good]);
    });

    it("a file that became invalid before a write: the write fails and leaves it", async () => {
      const lock = await ProjectLock.open(dir);
      lock.record(good);
      await writeFile(file, "garbage");
      await expect(lock.save()).rejects.toMatchObject({ code: "CONFIG_LOCK_INVALID", file });
      expect(await readFile(file, "utf8")).toBe("garbage");
      expect((await readdir(dir)).sort()).toEqual([LOCK_FILE]);
    });
  });

  it("build --update of the whole project drops pins no image uses; with names, it drops none", async () => {
    // Only local roots: nothing to re-resolve, so no registry is asked.
    const graph = buildImageGraph([{ name: "bb", module: null, from: null, definition: { ref: "builtin:busybox" } }]);
    const lock = await ProjectLock.open(dir);
    lock.record(pin("python:3-bookworm", D("a")));
    await lock.save();
    const named = await ProjectLock.open(dir);
    await updatePins(named, graph, ["bb"]);
    expect(await named.save()).toEqual([]);
    const all = await ProjectLock.open(dir);
    await updatePins(all, graph);
    expect((await all.save()).map((c) => [c.change, c.ref])).toEqual([["dropped", "python:3-bookworm"]]);
    expect((await ProjectLock.open(dir)).entries).toEqual([]);
  });

  it("a frozen build refuses a tag without a pin, naming the ref, the image and the file", async () => {
    const graph = buildImageGraph([
      { name: "py", module: null, from: null, definition: { ref: "python:3-bookworm" } },
      { name: "agent", module: null, from: "py", definition: {} },
      { name: "bb", module: null, from: null, definition: { ref: "builtin:busybox" } },
      { name: "pinned", module: null, from: null, definition: { ref: "node:20" } },
      { name: "digest", module: null, from: null, definition: { ref: `node@${D("d")}` } },
    ]);
    const lock = await ProjectLock.open(dir);
    lock.record(pin("node:20", D("a")));
    await lock.save();
    const opened = await ProjectLock.open(dir);
    expect(() => requirePins(opened, graph, ["bb", "pinned", "digest"])).not.toThrow();
    let err: BuildError | undefined;
    try {
      requirePins(opened, graph, graph.withAncestors(["agent"]));
    } catch (e) {
      err = e as BuildError;
    }
    expect(err).toBeInstanceOf(BuildError);
    expect(err!.code).toBe("BUILD_FROZEN_UNPINNED");
    expect(err!.message).toContain(`frozen build: ${file} does not pin "python:3-bookworm" (image py, linux/`);
    expect(err!.hint).toContain("supermachine build --update py");
    expect(err!.hint).toContain("without --frozen");
  });
});

describe("why names a moved pin", () => {
  const inputs = (over: Partial<SnapshotInputs>): SnapshotInputs =>
    ({ parent: null, manifestDigest: D("a"), module: null, engine: { qemu: "q", accel: "tcg", kernelKey: "k", agentKey: "a", agentVersion: "1" }, memoryMib: 256, ...over }) as SnapshotInputs;
  const sources = (over: Partial<SnapshotSources> = {}): SnapshotSources => ({ name: "py", ref: "python:3-bookworm", module: null, files: {}, ...over });

  it("as lock:<ref> for a root image, with the old and new digests, instead of image", () => {
    const changes = diffInputs(
      { inputs: inputs({}), sources: sources({ pin: { platform: "linux/amd64", digest: D("a") } }) },
      { inputs: inputs({ manifestDigest: D("b") }), sources: sources({ pin: { platform: "linux/amd64", digest: D("b") } }) },
    );
    expect(changes).toEqual([{ input: "lock:python:3-bookworm", before: D("a"), after: D("b") }]);
  });

  it("for a last bake made before the image had a pin", () => {
    const changes = diffInputs({ inputs: inputs({}), sources: sources() }, { inputs: inputs({ manifestDigest: D("b") }), sources: sources({ pin: { platform: "linux/amd64", digest: D("b") } }) });
    expect(changes).toEqual([{ input: "lock:python:3-bookworm", before: D("a"), after: D("b") }]);
  });

  it("as image when the ref changed, or nothing is pinned", () => {
    expect(
      diffInputs(
        { inputs: inputs({}), sources: sources({ ref: "python:3.11", pin: { platform: "linux/amd64", digest: D("a") } }) },
        { inputs: inputs({ manifestDigest: D("b") }), sources: sources({ pin: { platform: "linux/amd64", digest: D("b") } }) },
      ).map((c) => c.input),
    ).toEqual(["ref", "image"]);
    expect(diffInputs({ inputs: inputs({}), sources: sources() }, { inputs: inputs({ manifestDigest: D("b") }), sources: sources() }).map((c) => c.input)).toEqual(["image"]);
  });

  it("for a child, besides parent, when its last bake recorded the pin", () => {
    const child = (parent: string, digest: string | undefined) => ({
      inputs: inputs({ parent, manifestDigest: null }),
      sources: sources({ name: "agent", ...(digest ? { pin: { platform: "linux/amd64", digest } } : {}) }),
    });
    expect(diffInputs(child("k1", D("a")), child("k2", D("b")))).toEqual([
      { input: "lock:python:3-bookworm", before: D("a"), after: D("b") },
      { input: "parent", before: "k1", after: "k2" },
    ]);
    // Its parent changed for another reason: the pin is the same.
    expect(diffInputs(child("k1", D("a")), child("k2", D("a"))).map((c) => c.input)).toEqual(["parent"]);
    // A last bake without a pin says nothing of one.
    expect(diffInputs(child("k1", undefined), child("k2", D("b"))).map((c) => c.input)).toEqual(["parent"]);
  });
});
