/**
 * Hostile layers: every case goes through resolveImage on an OCI layout in a temp dir and must
 * fail with a stable code, a message naming the image, the layer digest and the entry, and
 * nothing left in the image cache.
 *
 * resolveImage has no way (yet) to pass FlattenOptions, so the flatten module is wrapped to
 * merge in `limits`, which the limit tests set: the same thing store.ts will do once it
 * forwards `ResolveImageOptions.flatten` (see the report).
 */
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import type { FlattenOptions } from "../../src/image/flatten.js";
import { planFlatten, streamFlattened } from "../../src/image/flatten.js";
import { resolveImage } from "../../src/image/resolve.js";
import { makeTar, rawTar, readTar, removeDir, tempDir, writeLayerBlobs, writeLayout, type LayoutLayer, type RawTarEntry, type TestEntry } from "../helpers/image.js";

const hoisted = vi.hoisted(() => ({ limits: {} as { maxLayerBytes?: number; maxLayerEntries?: number } }));
vi.mock("../../src/image/flatten.js", async (importOriginal) => {
  const mod = await importOriginal<typeof import("../../src/image/flatten.js")>();
  return {
    ...mod,
    planFlatten: (layers: Parameters<typeof mod.planFlatten>[0], opts: FlattenOptions = {}) => mod.planFlatten(layers, { ...opts, ...hoisted.limits }),
    streamFlattened: (plan: Parameters<typeof mod.streamFlattened>[0], opts: FlattenOptions = {}) => mod.streamFlattened(plan, { ...opts, ...hoisted.limits }),
  };
});

let home: string;
let work: string;
beforeEach(async () => {
  home = await tempDir("sm-home-");
  work = await tempDir("sm-hostile-");
  hoisted.limits = {};
});
afterEach(async () => {
  await removeDir(home);
  await removeDir(work);
});

const base = (): Promise<Buffer> => makeTar([{ name: "etc/", type: "directory" }, { name: "etc/motd", data: "hi\n" }]);
const tarOf = (entries: TestEntry[]) => makeTar(entries);

/** Nothing may remain in the image cache: no entry, no temp dir, no lock. */
async function expectNoLeftovers(): Promise<void> {
  const images = join(home, "images");
  expect(existsSync(images) ? await readdir(images) : []).toEqual([]);
}

/**
 * Resolves an image made of `layers` and expects it to be refused with `code`, the message
 * naming the ref, the digest of layer `culprit` (default: the last) and every string of `names`.
 */
async function expectRefused(layers: LayoutLayer[], code: string | string[], names: Array<string | RegExp>, culprit = layers.length - 1): Promise<Error> {
  const layout = join(work, "img");
  const { layerDigests } = await writeLayout(layout, { layers });
  const ref = `oci:${layout}`;
  const err = (await resolveImage(ref, { home }).then(
    () => new Error("resolved"),
    (e: unknown) => e,
  )) as Error & { code?: string };
  expect(err).toMatchObject({ name: "ImageError" });
  expect(Array.isArray(code) ? code : [code]).toContain(err.code);
  expect(err.message).toContain(JSON.stringify(ref));
  expect(err.message).toContain(layerDigests[culprit]!);
  for (const n of names) {
    if (typeof n === "string") expect(err.message).toContain(n);
    else expect(err.message).toMatch(n);
  }
  await expectNoLeftovers();
  return err;
}

const unsquashfs = (...args: string[]) => execFileSync("unsquashfs", args, { encoding: "utf8" });

describe("hostile entry names", () => {
  it("refuses a '..' component", async () => {
    await expectRefused([{ tar: await base() }, { tar: await tarOf([{ name: "a/../../etc/passwd", data: "pwn" }]) }], "IMAGE_LAYER_UNSAFE", ["a/../../etc/passwd", "'..'"]);
  });

  it("refuses '..' after a leading '/'", async () => {
    await expectRefused([{ tar: await tarOf([{ name: "/../../root/.ssh/authorized_keys", data: "k" }]) }], "IMAGE_LAYER_UNSAFE", ["/../../root/.ssh/authorized_keys"]);
  });

  it("strips a leading '/' (as docker does) and builds", async () => {
    const layout = join(work, "img");
    await writeLayout(layout, { layers: [{ tar: await tarOf([{ name: "/abs/", type: "directory" }, { name: "/abs/file", data: "absolute\n" }]) }] });
    const image = await resolveImage(`oci:${layout}`, { home });
    expect(unsquashfs("-cat", image.rootfsPath, "abs/file")).toBe("absolute\n");
  });

  // tar-stream 3.3 refuses these in its parser (IMAGE_LAYER_INVALID, its message); with 3.2,
  // which passes them on, the flattener's own check refuses them (IMAGE_LAYER_UNSAFE).
  it("refuses a NUL byte in a name (pax path)", async () => {
    const tar = rawTar([{ name: "placeholder", pax: { path: Buffer.from("etc/evil\0.conf") }, data: "x" }]);
    await expectRefused([{ tar: await base() }, { tar }], ["IMAGE_LAYER_UNSAFE", "IMAGE_LAYER_INVALID"], [/NUL byte|null byte/i]);
  });

  it("refuses a NUL byte in a symlink target (pax linkpath)", async () => {
    const tar = rawTar([{ name: "link", typeflag: "2", linkname: "x", pax: { linkpath: Buffer.from("/etc\0/passwd") } }]);
    await expectRefused([{ tar }], ["IMAGE_LAYER_UNSAFE", "IMAGE_LAYER_INVALID"], [/NUL byte|null byte/i]);
  });

  it("refuses a name longer than 4096 bytes", async () => {
    const long = Array.from({ length: 50 }, (_, i) => `${i}`.padEnd(100, "d")).join("/"); // 5049 bytes, short components
    const tar = rawTar([{ name: "placeholder", pax: { path: long }, data: "x" }]);
    const err = await expectRefused([{ tar }], "IMAGE_LAYER_NAME_TOO_LONG", [long.slice(0, 256), "5049 bytes"]);
    expect(err.message.length).toBeLessThan(1000); // the name is shortened in the message
  });

  it("refuses a path component longer than 255 bytes", async () => {
    const name = `dir/${"c".repeat(300)}`;
    const tar = rawTar([{ name: "placeholder", pax: { path: name }, data: "x" }]);
    await expectRefused([{ tar }], "IMAGE_LAYER_NAME_TOO_LONG", [name.slice(0, 200), "component of 300 bytes"]);
  });
});

describe("hostile hardlinks", () => {
  it("refuses a target with '..'", async () => {
    await expectRefused([{ tar: await base() }, { tar: await tarOf([{ name: "shadow", type: "link", linkname: "../../etc/shadow" }]) }], "IMAGE_LAYER_UNSAFE", ['"shadow"', "../../etc/shadow"]);
  });

  it("refuses a target that does not exist in the image so far", async () => {
    const top = await tarOf([
      { name: "early", type: "link", linkname: "etc/later" }, // target comes after the link
      { name: "etc/later", data: "l" },
    ]);
    await expectRefused([{ tar: await base() }, { tar: top }], "IMAGE_LAYER_UNSAFE", ['"early"', "etc/later", "does not exist"]);
  });

  it("refuses a hardlink to a directory", async () => {
    await expectRefused([{ tar: await base() }, { tar: await tarOf([{ name: "etc-again", type: "link", linkname: "etc" }]) }], "IMAGE_LAYER_UNSAFE", ['"etc-again"', "is a directory"]);
  });

  it("refuses a target reached through a symlink", async () => {
    const l1 = await tarOf([{ name: "hostetc", type: "symlink", linkname: "/etc" }]);
    const l2 = await tarOf([{ name: "pw", type: "link", linkname: "hostetc/passwd" }]);
    await expectRefused([{ tar: l1 }, { tar: l2 }], "IMAGE_LAYER_UNSAFE", ['"pw"', "hostetc/passwd", '"hostetc" is a symlink']);
  });
});

describe("writing through symlinks", () => {
  it("refuses an entry below a symlink to an absolute path from a lower layer", async () => {
    const l1 = await tarOf([{ name: "etc", type: "symlink", linkname: "/tmp" }]);
    const l2 = await tarOf([{ name: "etc/cron.d/evil", data: "* * * * * root sh\n" }]);
    await expectRefused([{ tar: l1 }, { tar: l2 }], "IMAGE_LAYER_UNSAFE", ["etc/cron.d/evil", 'parent "etc" is a symlink']);
  });

  it("refuses an entry below a relative escaping symlink", async () => {
    const l1 = await tarOf([{ name: "evil", type: "symlink", linkname: "../../.." }]);
    const l2 = await tarOf([{ name: "evil/x", data: "x" }]);
    await expectRefused([{ tar: l1 }, { tar: l2 }], "IMAGE_LAYER_UNSAFE", ["evil/x", 'parent "evil"']);
  });

  it("refuses an entry below a symlink of the same layer", async () => {
    const l1 = await tarOf([{ name: "d/", type: "directory" }, { name: "d/up", type: "symlink", linkname: "/" }, { name: "d/up/root/.profile", data: "x" }]);
    await expectRefused([{ tar: l1 }], "IMAGE_LAYER_UNSAFE", ["d/up/root/.profile", 'parent "d/up"']);
  });

  it("refuses a whiteout below a symlink", async () => {
    const l1 = await tarOf([{ name: "evil", type: "symlink", linkname: "/etc" }]);
    const l2 = await tarOf([{ name: "evil/.wh.passwd" }]);
    await expectRefused([{ tar: l1 }, { tar: l2 }], "IMAGE_LAYER_UNSAFE", ["evil/.wh.passwd", 'parent "evil"']);
  });

  it("refuses an entry below a hardlink to a symlink", async () => {
    const l1 = await tarOf([{ name: "s", type: "symlink", linkname: "/etc" }, { name: "h", type: "link", linkname: "s" }]);
    const l2 = await tarOf([{ name: "h/passwd", data: "x" }]);
    await expectRefused([{ tar: l1 }, { tar: l2 }], "IMAGE_LAYER_UNSAFE", ["h/passwd", 'parent "h"']);
  });

  it("allows symlinks to anywhere, and a directory replacing a symlink", async () => {
    const layout = join(work, "img");
    const l1 = await tarOf([
      { name: "etc", type: "symlink", linkname: "/tmp" },
      { name: "abs", type: "symlink", linkname: "/etc/passwd" },
      { name: "rel", type: "symlink", linkname: "../../../../x" },
    ]);
    const l2 = await tarOf([{ name: "etc/", type: "directory" }, { name: "etc/motd", data: "ok\n" }]);
    await writeLayout(layout, { layers: [{ tar: l1 }, { tar: l2 }] });
    const image = await resolveImage(`oci:${layout}`, { home });
    expect(unsquashfs("-cat", image.rootfsPath, "etc/motd")).toBe("ok\n");
    const listing = unsquashfs("-lls", "-d", "", image.rootfsPath);
    expect(listing).toContain("/abs -> /etc/passwd");
    expect(listing).toContain("/rel -> ../../../../x");
  });
});

describe("special files", () => {
  // Device nodes and fifos are kept (see flatten.ts): the squashfs holds them as inodes, nothing
  // is created on the host, and the guest's /dev is a devtmpfs over them.
  it("keeps character and block devices and fifos in the squashfs", async () => {
    const tar = rawTar([
      { name: "dev/", typeflag: "5", mode: 0o755 },
      { name: "dev/console", typeflag: "3", mode: 0o600, devmajor: 5, devminor: 1 },
      { name: "dev/null", typeflag: "3", mode: 0o666, devmajor: 1, devminor: 3 },
      { name: "dev/sda", typeflag: "4", mode: 0o660, devmajor: 8, devminor: 0 },
      { name: "dev/initctl", typeflag: "6", mode: 0o600 },
      { name: "kmem", typeflag: "3", mode: 0o640, devmajor: 1, devminor: 2 }, // outside /dev too
    ]);
    const layout = join(work, "img");
    await writeLayout(layout, { layers: [{ tar: await base() }, { tar }] });
    const image = await resolveImage(`oci:${layout}`, { home });
    const lines = unsquashfs("-lls", "-d", "", image.rootfsPath).split("\n");
    const find = (path: string) => lines.find((l) => l.endsWith(` ${path}`));
    expect(find("/dev/console")).toMatch(/^crw------- root\/root\s+5,\s*1 /);
    expect(find("/dev/null")).toMatch(/^crw-rw-rw- root\/root\s+1,\s*3 /);
    expect(find("/dev/sda")).toMatch(/^brw-rw---- root\/root\s+8,\s*0 /);
    expect(find("/dev/initctl")).toMatch(/^prw------- /);
    expect(find("/kmem")).toMatch(/^crw-r----- root\/root\s+1,\s*2 /);
    expect(unsquashfs("-cat", image.rootfsPath, "etc/motd")).toBe("hi\n");
  });

  it("passes devices and fifos through the flattened stream, replaceable like any entry", async () => {
    const l1 = rawTar([{ name: "null", typeflag: "3", devmajor: 1, devminor: 3 }, { name: "pipe", typeflag: "6" }, { name: "gone", typeflag: "4", devmajor: 8, devminor: 0 }]);
    const l2 = rawTar([{ name: ".wh.gone" }, { name: "pipe", data: "now a file" }]);
    const blobs = await writeLayerBlobs(join(work, "blobs"), [{ tar: l1 }, { tar: l2 }]);
    const plan = await planFlatten(blobs, { ref: "t" });
    const out = await readTar(streamFlattened(plan, { ref: "t" }));
    expect(out.map((e) => [e.name, e.type, e.data])).toEqual([
      ["null", "character-device", ""],
      ["pipe", "file", "now a file"],
    ]);
  });
});

describe("limits", () => {
  /**
   * A gzip bomb: one gzip member per entry (a header, then `entrySize` zeros shared by all
   * members), so it is small to build and inflates to entries * entrySize bytes.
   */
  function gzipBomb(entries: number, entrySize: number): Buffer {
    const zeros = gzipSync(Buffer.alloc(entrySize), { level: 9 });
    const parts: Buffer[] = [];
    for (let i = 0; i < entries; i++) {
      parts.push(gzipSync(rawTar([{ name: `zero${i}`, sizeField: Buffer.from(`${entrySize.toString(8).padStart(11, "0")}\0`) }], false)), zeros);
    }
    parts.push(gzipSync(Buffer.alloc(1024)));
    return Buffer.concat(parts);
  }

  it("stops inflating a gzip bomb at maxLayerBytes", async () => {
    hoisted.limits = { maxLayerBytes: 8 * 1024 ** 2 };
    const bomb = gzipBomb(8192, 1024 ** 2); // ~9 MB that inflates to 8 GiB (~12 s of gunzip alone)
    expect(bomb.length).toBeLessThan(16 * 1024 ** 2);
    const t0 = performance.now();
    const err = await expectRefused([{ tar: Buffer.alloc(0), raw: bomb, mediaType: "application/vnd.oci.image.layer.v1.tar+gzip" }], "IMAGE_LAYER_TOO_LARGE", [
      "more than 8388608 bytes",
      '(in entry "zero7")',
    ]);
    const ms = performance.now() - t0;
    console.log(`gzip bomb refused after ${ms.toFixed(0)} ms: ${err.message}`);
    expect(ms).toBeLessThan(3_000); // inflating all 8 GiB would take far longer
  });

  it("refuses an entry whose size header exceeds the layer limit (default 16 GiB) before reading it", async () => {
    const size = 20 * 1024 ** 3;
    const tar = rawTar([{ name: "huge", sizeField: Buffer.from(`${size.toString(8).padStart(11, "0")}\0`) }], false);
    await expectRefused([{ tar }], "IMAGE_LAYER_TOO_LARGE", ['"huge"', `${size} bytes`, `${16 * 1024 ** 3}-byte`]);
  });

  it("refuses more entries than maxLayerEntries", async () => {
    hoisted.limits = { maxLayerEntries: 10 };
    const entries = Array.from({ length: 12 }, (_, i): TestEntry => ({ name: `f${i}`, data: "" }));
    await expectRefused([{ tar: await tarOf(entries) }], "IMAGE_LAYER_TOO_MANY_ENTRIES", ["more than 10 entries", '"f10"']);
  });
});

describe("corrupt layers", () => {
  it("refuses a truncated gzip stream", async () => {
    const tar = await tarOf([{ name: "etc/", type: "directory" }, { name: "etc/big", data: randomBytes(200_000).toString("base64") }]);
    const gz = gzipSync(tar);
    const raw = gz.subarray(0, Math.floor(gz.length * 0.6));
    const err = await expectRefused([{ tar, raw, mediaType: "application/vnd.oci.image.layer.v1.tar+gzip" }], "IMAGE_LAYER_INVALID", ["gzip-compressed", '(in entry "etc/big")']);
    expect(err.message).toMatch(/unexpected end of file/i);
  });

  it("refuses a truncated tar", async () => {
    const tar = await tarOf([{ name: "a", data: "a" }, { name: "big", data: "x".repeat(10_000) }]);
    const raw = tar.subarray(0, 512 * 3 + 4000);
    const err = await expectRefused([{ tar, raw }], "IMAGE_LAYER_INVALID", ['(in entry "big")']);
    expect(err.message).toContain("Unexpected end of data");
  });

  it("refuses a layer whose bytes do not match its digest", async () => {
    const layout = join(work, "img");
    const { layerPaths, layerDigests } = await writeLayout(layout, { layers: [{ tar: await tarOf([{ name: "motd", data: "original text" }]) }] });
    const blob = await readFile(layerPaths[0]!);
    const at = blob.indexOf("original");
    blob.write("tampered", at); // still a valid tar: only the digest tells
    await writeFile(layerPaths[0]!, blob);
    const err = (await resolveImage(`oci:${layout}`, { home }).catch((e: unknown) => e)) as Error;
    expect(err).toMatchObject({ code: "IMAGE_DIGEST_MISMATCH" });
    expect(err.message).toContain(layerDigests[0]!);
    expect(err.message).toContain(layerPaths[0]!);
    await expectNoLeftovers();
  });

  it("refuses a negative size field (base-256)", async () => {
    const minusOne = Buffer.from([0xff, ...Array<number>(10).fill(0xff), 0xfe]);
    const tar = rawTar([{ name: "ok", data: "1" }, { name: "negative", sizeField: minusOne }]);
    await expectRefused([{ tar }], "IMAGE_LAYER_INVALID", ['(at entry "negative")', "Invalid header"]);
  });

  it("refuses an absurd size field (base-256, beyond 2^53)", async () => {
    const huge = Buffer.from([0x80, 0x01, ...Array<number>(10).fill(0)]);
    const tar = rawTar([{ name: "absurd", sizeField: huge }], false);
    await expectRefused([{ tar }], "IMAGE_LAYER_INVALID", ['"absurd"', "invalid size field"]);
  });

  it("refuses a pax size record that is not a number", async () => {
    const tar = rawTar([{ name: "placeholder", pax: { path: "from-pax", size: "abc" }, data: "" }]);
    await expectRefused([{ tar }], "IMAGE_LAYER_INVALID", ['(at entry "from-pax")', "Invalid header"]);
  });

  it("refuses an oversized pax header", async () => {
    const header: RawTarEntry = { name: "PaxHeader/huge", typeflag: "x", sizeField: Buffer.from(`${(64 * 1024 ** 2).toString(8).padStart(11, "0")}\0`) };
    const tar = Buffer.concat([rawTar([{ name: "before", data: "b" }], false), rawTar([header], false)]);
    await expectRefused([{ tar }], "IMAGE_LAYER_INVALID", ['(at entry "PaxHeader/huge")', "Header exceeds max size"]);
  });

  it("refuses a corrupt header checksum, naming the entry before it", async () => {
    const tar = rawTar([{ name: "good", data: "g" }, { name: "bad", data: "b" }]);
    tar.write("000001", 1024 + 148, "latin1"); // damage the second header's checksum field
    await expectRefused([{ tar }], "IMAGE_LAYER_INVALID", ['(after entry "good")', "Invalid tar header"]);
  });
});
