import { execFileSync, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { PassThrough } from "node:stream";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { decompressStream, detectCompression, sniffCompression } from "../../src/image/decompress.js";
import { planFlatten, streamFlattened } from "../../src/image/flatten.js";
import type { LayerBlob } from "../../src/oci/oci-layout.js";
import { resolveImage } from "../../src/image/resolve.js";
import { waitFor } from "../helpers/vm.js";
import { makeTar, rawTar, readTar, removeDir, sha256, tempDir, writeLayout, zstdCompress } from "../helpers/image.js";

let home: string;
let work: string;
beforeEach(async () => {
  home = await tempDir("sm-home-");
  work = await tempDir("sm-zstd-");
});
afterEach(async () => {
  await removeDir(home);
  await removeDir(work);
});

const unsquashfs = (...args: string[]) => execFileSync("unsquashfs", args, { encoding: "utf8" });

/** zstd processes that are children of this (test worker) process. */
function zstdChildren(): number[] {
  const r = spawnSync("ps", ["-o", "pid=,stat=,comm=", "--ppid", String(process.pid)], { encoding: "utf8" });
  return r.stdout
    .split("\n")
    .map((l) => l.trim().split(/\s+/))
    .filter((f) => f[2] === "zstd" && !f[1]?.startsWith("Z"))
    .map((f) => Number(f[0]));
}

/** Writes `blob` as a layer file and returns its descriptor. */
async function layerFile(blob: Buffer, mediaType = "application/vnd.oci.image.layer.v1.tar+zstd"): Promise<LayerBlob> {
  const path = join(work, sha256(blob).slice(7));
  await writeFile(path, blob);
  return { digest: sha256(blob), size: blob.length, path, mediaType };
}

/** `n` entries of `size` zero bytes each: a tar that zstd shrinks to almost nothing. */
const zeroEntries = (n: number, size: number) => rawTar(Array.from({ length: n }, (_, i) => ({ name: `z${i}`, data: Buffer.alloc(size) })));

describe("zstd layers", () => {
  it("builds an image from zstd, gzip and plain layers", async () => {
    const layout = join(work, "img");
    const l1 = await makeTar([{ name: "bin/", type: "directory" }, { name: "bin/tool", data: "zstd layer\n", mode: 0o755 }, { name: "etc/", type: "directory" }, { name: "etc/a", data: "a" }]);
    const l2 = await makeTar([{ name: "etc/.wh.a" }, { name: "etc/b", data: "gzip layer\n" }]);
    const l3 = await makeTar([{ name: "etc/c", data: "plain layer\n" }, { name: "bin/alias", type: "link", linkname: "bin/tool" }]);
    const { manifestDigest } = await writeLayout(layout, { layers: [{ tar: l1, compression: "zstd" }, { tar: l2, gzip: true }, { tar: l3 }] });
    const image = await resolveImage(`oci:${layout}`, { home });
    expect(image.manifestDigest).toBe(manifestDigest);
    expect(unsquashfs("-cat", image.rootfsPath, "bin/tool")).toBe("zstd layer\n");
    expect(unsquashfs("-cat", image.rootfsPath, "bin/alias")).toBe("zstd layer\n");
    expect(unsquashfs("-cat", image.rootfsPath, "etc/b")).toBe("gzip layer\n");
    expect(unsquashfs("-lls", "-d", "", image.rootfsPath)).not.toContain("/etc/a");
    expect(zstdChildren()).toEqual([]);
  });

  it("detects zstd by magic bytes whatever the media type says", async () => {
    const layout = join(work, "img");
    const tar = await makeTar([{ name: "hello", data: "by magic\n" }]);
    await writeLayout(layout, { layers: [{ tar, compression: "zstd", mediaType: "application/vnd.oci.image.layer.v1.tar" }] });
    const image = await resolveImage(`oci:${layout}`, { home });
    expect(unsquashfs("-cat", image.rootfsPath, "hello")).toBe("by magic\n");
  });

  it("reads multi-frame zstd (as written by parallel compressors)", async () => {
    const a = await makeTar([{ name: "a", data: "A" }]);
    const frames = Buffer.concat([zstdCompress(a.subarray(0, 512)), zstdCompress(a.subarray(512))]);
    const plan = await planFlatten([await layerFile(frames)], { ref: "t" });
    expect((await readTar(streamFlattened(plan, { ref: "t" }))).map((e) => e.data)).toEqual(["A"]);
  });

  it("enforces maxLayerBytes on decompressed zstd and stops zstd", async () => {
    const blob = zstdCompress(zeroEntries(64, 1024 ** 2), 1); // 64 MiB of tar in a few KiB
    expect(blob.length).toBeLessThan(1024 ** 2);
    const layer = await layerFile(blob);
    const err = (await planFlatten([layer], { ref: "zbomb", maxLayerBytes: 4 * 1024 ** 2 }).catch((e: unknown) => e)) as Error;
    expect(err).toMatchObject({ code: "IMAGE_LAYER_TOO_LARGE" });
    expect(err.message).toContain(layer.digest);
    expect(err.message).toContain('(in entry "z3")');
    expect(await waitFor(() => zstdChildren().length === 0, 2_000)).toBe(true);
  });

  it("kills zstd when the consumer stops early", async () => {
    // An unsafe entry right at the start, then 256 MiB that zstd would still be decoding.
    const tar = Buffer.concat([rawTar([{ name: "ok", data: "1" }, { name: "../escape", data: "x" }], false), zeroEntries(256, 1024 ** 2)]);
    const layer = await layerFile(zstdCompress(tar, 1));
    const t0 = performance.now();
    await expect(planFlatten([layer], { ref: "t" })).rejects.toMatchObject({ code: "IMAGE_LAYER_UNSAFE" });
    expect(await waitFor(() => zstdChildren().length === 0, 2_000)).toBe(true);
    expect(performance.now() - t0).toBeLessThan(2_000);
  });

  it("reports a truncated zstd layer with zstd's message", async () => {
    const tar = await makeTar([{ name: "f", data: randomBytes(100_000).toString("hex") }]);
    const z = zstdCompress(tar);
    const layer = await layerFile(z.subarray(0, Math.floor(z.length / 2)));
    const err = (await planFlatten([layer], { ref: "t" }).catch((e: unknown) => e)) as Error;
    expect(err).toMatchObject({ code: "IMAGE_LAYER_INVALID" });
    expect(err.message).toContain(layer.digest);
    expect(err.message).toContain("zstd-compressed");
    expect(err.message).toMatch(/zstd exited with status \d+: .*(truncated|unexpected end|premature)/i);
  });

  it("fails clearly when the zstd program is missing", async () => {
    const layer = await layerFile(zstdCompress(await makeTar([{ name: "a", data: "a" }])));
    const path = process.env.PATH;
    process.env.PATH = work; // no zstd here
    try {
      const err = (await planFlatten([layer], { ref: "t" }).catch((e: unknown) => e)) as Error & { hint?: string };
      expect(err).toMatchObject({ name: "SetupError", code: "ZSTD_NOT_FOUND" });
      expect(err.message).toContain(layer.digest);
      expect(err.hint).toContain("apt-get install zstd");
    } finally {
      process.env.PATH = path;
    }
  });
});

describe("decompress", () => {
  it("sniffs compressions by magic and refuses xz and bzip2", () => {
    expect(sniffCompression(Buffer.from([0x1f, 0x8b, 8, 0]))).toBe("gzip");
    expect(sniffCompression(Buffer.from([0x28, 0xb5, 0x2f, 0xfd]))).toBe("zstd");
    expect(sniffCompression(Buffer.from([0x50, 0x2a, 0x4d, 0x18]))).toBe("zstd"); // skippable frame
    expect(sniffCompression(Buffer.from("ustar"))).toBe("none");
    expect(sniffCompression(Buffer.alloc(0))).toBe("none");
    expect(() => detectCompression(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]), "layer X")).toThrow(
      expect.objectContaining({ code: "IMAGE_LAYER_COMPRESSION_UNSUPPORTED", message: "layer X is xz-compressed, which is not supported" }),
    );
    expect(() => detectCompression(Buffer.from("BZh91AY"), "layer X")).toThrow(expect.objectContaining({ code: "IMAGE_LAYER_COMPRESSION_UNSUPPORTED" }));
  });

  it("streams zstd through the CLI with backpressure and a byte limit", async () => {
    const data = randomBytes(3 * 1024 ** 2);
    const input = new PassThrough();
    input.end(zstdCompress(data));
    const chunks: Buffer[] = [];
    for await (const c of decompressStream(input, "zstd", { what: "test" })) chunks.push(c as Buffer);
    expect(Buffer.concat(chunks).equals(data)).toBe(true);

    const again = new PassThrough();
    again.end(zstdCompress(data));
    const limited = decompressStream(again, "zstd", { what: "test blob", maxBytes: 1024 ** 2 });
    await expect(
      (async () => {
        for await (const _ of limited) void _;
      })(),
    ).rejects.toMatchObject({ code: "IMAGE_LAYER_TOO_LARGE", message: "test blob decompresses to more than 1048576 bytes" });
    expect(await waitFor(() => zstdChildren().length === 0, 2_000)).toBe(true);
  });
});
