import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { normalizeTarPath, planFlatten, streamFlattened } from "../../src/image/flatten.js";
import { makeTar, readTar, removeDir, sha256, tempDir, writeLayerBlobs, type TestEntry } from "../helpers/image.js";

let dir: string;
beforeEach(async () => {
  dir = await tempDir();
});
afterEach(async () => {
  await removeDir(dir);
});

/** Flattens layers given as entry lists (alternating gzip/plain) and returns the merged entries. */
async function flatten(...layers: TestEntry[][]) {
  const tars = await Promise.all(layers.map((l) => makeTar(l)));
  const blobs = await writeLayerBlobs(dir, tars.map((tar, i) => ({ tar, gzip: i % 2 === 0 })));
  const plan = await planFlatten(blobs, { ref: "test" });
  return readTar(streamFlattened(plan, { ref: "test" }));
}

const names = (entries: { name: string }[]) => entries.map((e) => e.name.replace(/\/$/, "")).sort();

describe("normalizeTarPath", () => {
  it("strips ./ and / prefixes and flags '..'", () => {
    expect(normalizeTarPath("./a//b/./c/").path).toBe("a/b/c");
    expect(normalizeTarPath("/etc/passwd").path).toBe("etc/passwd");
    expect(normalizeTarPath("./").path).toBe("");
    expect(normalizeTarPath("a/../../etc").unsafe).toBe(true);
  });
});

describe("flatten", () => {
  it("whiteout deletes a file from a lower layer and is not emitted", async () => {
    const out = await flatten(
      [{ name: "etc/", type: "directory" }, { name: "etc/a", data: "a" }, { name: "etc/b", data: "b" }],
      [{ name: "etc/.wh.a" }],
    );
    expect(names(out)).toEqual(["etc", "etc/b"]);
  });

  it("whiteout deletes a directory subtree", async () => {
    const out = await flatten(
      [{ name: "d/", type: "directory" }, { name: "d/sub/", type: "directory" }, { name: "d/sub/f", data: "x" }, { name: "keep", data: "k" }],
      [{ name: ".wh.d" }],
    );
    expect(names(out)).toEqual(["keep"]);
  });

  it("a whiteout does not delete an entry of its own layer", async () => {
    const out = await flatten([{ name: "a", data: "old" }], [{ name: "a", data: "new" }, { name: ".wh.a" }]);
    expect(out.find((e) => e.name === "a")?.data).toBe("new");
  });

  it("opaque directory hides lower contents but keeps same-layer entries", async () => {
    const out = await flatten(
      [{ name: "d/", type: "directory" }, { name: "d/lower1", data: "1" }, { name: "d/sub/", type: "directory" }, { name: "d/sub/x", data: "x" }, { name: "other", data: "o" }],
      [{ name: "d/", type: "directory", mode: 0o700 }, { name: "d/mine", data: "m" }, { name: "d/.wh..wh..opq" }],
    );
    expect(names(out)).toEqual(["d", "d/mine", "other"]);
    expect(out.find((e) => e.name.replace(/\/$/, "") === "d")?.mode).toBe(0o700);
  });

  it("a later file replaces an earlier one; each path is emitted once", async () => {
    const out = await flatten([{ name: "f", data: "one" }], [{ name: "f", data: "two" }], [{ name: "./f", data: "three" }]);
    expect(out.filter((e) => e.name === "f")).toHaveLength(1);
    expect(out.find((e) => e.name === "f")?.data).toBe("three");
  });

  it("a directory replaces a file", async () => {
    const out = await flatten([{ name: "x", data: "file" }], [{ name: "x/", type: "directory" }, { name: "x/inner", data: "i" }]);
    expect(names(out)).toEqual(["x", "x/inner"]);
    expect(out.find((e) => e.name.startsWith("x") && e.name.replace(/\/$/, "") === "x")?.type).toBe("directory");
  });

  it("a file replacing a directory hides the lower subtree", async () => {
    const out = await flatten(
      [{ name: "x/", type: "directory" }, { name: "x/a", data: "a" }, { name: "x/b/", type: "directory" }, { name: "x/b/c", data: "c" }],
      [{ name: "x", type: "symlink", linkname: "/elsewhere" }],
    );
    expect(names(out)).toEqual(["x"]);
    expect(out[0]).toMatchObject({ type: "symlink", linkname: "/elsewhere" });
  });

  it("directories merge across layers: upper metadata, contents of both", async () => {
    const out = await flatten(
      [{ name: "d/", type: "directory", mode: 0o755 }, { name: "d/a", data: "a" }],
      [{ name: "d/", type: "directory", mode: 0o750 }, { name: "d/b", data: "b" }],
    );
    expect(names(out)).toEqual(["d", "d/a", "d/b"]);
    expect(out.find((e) => e.type === "directory")?.mode).toBe(0o750);
  });

  it("emits parents before children, synthesizing missing ones", async () => {
    const out = await flatten([{ name: "a/b/c/file", data: "f" }], [{ name: "a/", type: "directory", mode: 0o711 }]);
    expect(out.map((e) => [e.name.replace(/\/$/, ""), e.type])).toEqual([
      ["a", "directory"],
      ["a/b", "directory"],
      ["a/b/c", "directory"],
      ["a/b/c/file", "file"],
    ]);
    expect(out[0]?.mode).toBe(0o711); // the surviving upper entry, emitted early
  });

  it("hardlink targets precede links, across layers", async () => {
    const out = await flatten(
      [{ name: "bin/", type: "directory" }, { name: "bin/tool", data: "T" }],
      [{ name: "bin/alias", type: "link", linkname: "./bin/tool" }, { name: "bin/alias2", type: "link", linkname: "bin/tool" }],
    );
    const order = out.map((e) => e.name);
    expect(order.indexOf("bin/tool")).toBeLessThan(order.indexOf("bin/alias"));
    expect(out.find((e) => e.name === "bin/alias")).toMatchObject({ type: "link", linkname: "bin/tool" });
    expect(out.find((e) => e.name === "bin/alias2")).toMatchObject({ type: "link", linkname: "bin/tool" });
  });

  it("drops a hardlink whose target was whited out or replaced later", async () => {
    const out = await flatten(
      [{ name: "t", data: "T" }, { name: "l", type: "link", linkname: "t" }, { name: "u", data: "U" }, { name: "m", type: "link", linkname: "u" }],
      [{ name: ".wh.t" }, { name: "u", data: "U2" }],
    );
    expect(names(out)).toEqual(["u"]);
    expect(out[0]?.data).toBe("U2");
  });

  it("refuses entries with '..' components", async () => {
    await expect(flatten([{ name: "ok", data: "1" }], [{ name: "a/../../etc/passwd", data: "pwn" }])).rejects.toMatchObject({
      code: "IMAGE_LAYER_UNSAFE",
      message: expect.stringContaining("a/../../etc/passwd"),
    });
  });

  it("refuses hardlinks pointing outside the root", async () => {
    await expect(flatten([{ name: "l", type: "link", linkname: "../../etc/shadow" }])).rejects.toMatchObject({ code: "IMAGE_LAYER_UNSAFE" });
  });

  it("keeps a mode of 0 and passes fifos through", async () => {
    const out = await flatten([{ name: "secret", data: "s", mode: 0 }, { name: "pipe", type: "fifo" }]);
    expect(out.find((e) => e.name === "secret")?.mode).toBe(0);
    expect(out.find((e) => e.name === "pipe")?.type).toBe("fifo");
  });

  it("rejects xz layers by magic bytes", async () => {
    const blob = Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0, 0]);
    const path = join(dir, "xz");
    await writeFile(path, blob);
    const layer = { digest: sha256(blob), size: blob.length, path, mediaType: "application/vnd.oci.image.layer.v1.tar+gzip" };
    await expect(planFlatten([layer], { ref: "test" })).rejects.toMatchObject({ code: "IMAGE_LAYER_COMPRESSION_UNSUPPORTED" });
  });

  it("verifies the layer digest while reading", async () => {
    const tar = await makeTar([{ name: "a", data: "a" }]);
    const [blob] = await writeLayerBlobs(dir, [{ tar }]);
    const wrong = { ...blob!, digest: sha256("something else") };
    await expect(planFlatten([wrong], { ref: "test" })).rejects.toMatchObject({ code: "IMAGE_DIGEST_MISMATCH" });
  });
});

describe("flatten names", () => {
  it("round-trips long and non-ASCII paths", async () => {
    const long = `${"d".repeat(120)}/${"f".repeat(120)}`;
    const out = await flatten([{ name: long, data: "L" }, { name: "ünïcødé", data: "U" }, { name: "s", type: "symlink", linkname: "t".repeat(150) }]);
    expect(out.find((e) => e.name === long)?.data).toBe("L");
    expect(out.find((e) => e.name === "ünïcødé")?.data).toBe("U");
    expect(out.find((e) => e.name === "s")?.linkname).toBe("t".repeat(150));
  });
});

describe("flatten whiteout directories", () => {
  it("an opaque marker alone keeps its directory, empty", async () => {
    const out = await flatten([{ name: "d/", type: "directory" }, { name: "d/x", data: "x" }], [{ name: "d/.wh..wh..opq" }]);
    expect(out.map((e) => [e.name.replace(/\/$/, ""), e.type])).toEqual([["d", "directory"]]);
  });
});
