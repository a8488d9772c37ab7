import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { Readable } from "node:stream";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { buildSquashfs } from "../../src/image/squashfs.js";
import { makeTar, removeDir, tempDir } from "../helpers/image.js";

let dir: string;
beforeEach(async () => {
  dir = await tempDir();
});
afterEach(async () => {
  await removeDir(dir);
});

describe("buildSquashfs", () => {
  it("builds the same squashfs twice from a tar stream", async () => {
    const tar = await makeTar([{ name: "a/", type: "directory" }, { name: "a/b", data: "hello" }]);
    const one = await buildSquashfs(Readable.from([tar]), join(dir, "one.sqfs"));
    const two = await buildSquashfs(Readable.from([tar]), join(dir, "two.sqfs"), { root: { mode: 0o755, uid: 0, gid: 0, mtime: 0 } });
    expect(one.sizeBytes).toBeGreaterThan(0);
    // Same size and same tree with the same attributes. Not byte for byte: sqfstar 4.5.1
    // ignores -root-time, so the root directory carries the build time (two builds that
    // straddle a second differ there). Nothing hashes the squashfs: images are keyed by manifest.
    expect(readFileSync(one.path).length).toBe(readFileSync(two.path).length);
    const tree = (p: string) => execFileSync("unsquashfs", ["-lls", "-d", "", p], { encoding: "utf8" }).split("\n").slice(1);
    expect(tree(one.path)).toEqual(tree(two.path));
    expect(tree(one.path).join("\n")).toMatch(/a\/b/);
    expect(execFileSync("unsquashfs", ["-cat", one.path, "a/b"], { encoding: "utf8" })).toBe("hello");
    expect((await readdir(dir)).sort()).toEqual(["one.sqfs", "two.sqfs"]);
  });

  it("reports sqfstar's stderr and leaves no temp file", async () => {
    const err = await buildSquashfs(Readable.from([Buffer.alloc(1024, 0x41)]), join(dir, "bad.sqfs")).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "IMAGE_SQUASHFS_FAILED" });
    expect((err as Error).message).toMatch(/sqfstar exited with status \d+ while building .*bad\.sqfs:\n.*checksum/);
    expect(await readdir(dir)).toEqual([]);
  });

  it("fails with the source's error when the tar stream breaks", async () => {
    const tar = await makeTar([{ name: "a", data: "x".repeat(100_000) }]);
    const source = new Readable({
      read() {
        this.push(tar.subarray(0, 4096));
        this.destroy(new Error("layer read failed"));
      },
    });
    await expect(buildSquashfs(source, join(dir, "broken.sqfs"))).rejects.toThrow("layer read failed");
    expect(await readdir(dir)).toEqual([]);
  });
});
