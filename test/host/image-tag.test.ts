// Local tags: a layout (or any source) named like a registry image, found without the network.
import { existsSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { listImages, removeImage } from "../../src/image/gc.js";
import { readRef } from "../../src/image/local-names.js";
import { resolveImage } from "../../src/image/resolve.js";
import { tagImage, type TagProgress } from "../../src/image/tag.js";
import { makeTar, removeDir, sha256, tempDir, writeLayout } from "../helpers/image.js";

let home: string;
let work: string;
beforeEach(async () => {
  home = await tempDir("sm-home-");
  work = await tempDir("sm-tag-");
});
afterEach(async () => {
  await removeDir(home);
  await removeDir(work);
});

const HOST_ARCH = process.arch === "arm64" ? "arm64" : "amd64";
const OTHER_ARCH = HOST_ARCH === "arm64" ? "amd64" : "arm64";
const storeBlob = (digest: string) => join(home, "store", "blobs", "sha256", digest.slice(7));

async function layout(dir: string, motd: string, opts: { tag?: string; architecture?: string } = {}) {
  const layer = await makeTar([{ name: "etc/", type: "directory" }, { name: "etc/motd", data: motd }]);
  return writeLayout(join(work, dir), { layers: [{ tar: layer, gzip: true }], config: { Cmd: ["/bin/sh"], Env: ["PATH=/bin"] }, ...opts });
}

/** A layout whose index.json points at an image index of a host and a foreign image. */
async function multiPlatformLayout(dir: string) {
  const host = await layout(dir, "host\n", { architecture: HOST_ARCH });
  const other = await layout(dir, "other\n", { architecture: OTHER_ARCH }); // same dir: shares blobs/, rewrites index.json
  const blobs = join(work, dir, "blobs", "sha256");
  const entry = async (m: { manifestDigest: string }, architecture: string) => ({
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    digest: m.manifestDigest,
    size: (await readFile(join(blobs, m.manifestDigest.slice(7)))).length,
    platform: { os: "linux", architecture },
  });
  const index = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests: [await entry(other, OTHER_ARCH), await entry(host, HOST_ARCH)] }));
  await writeFile(join(blobs, sha256(index).slice(7)), index);
  const top = { mediaType: "application/vnd.oci.image.index.v1+json", digest: sha256(index), size: index.length, annotations: { "org.opencontainers.image.ref.name": "multi" } };
  await writeFile(join(work, dir, "index.json"), JSON.stringify({ schemaVersion: 2, manifests: [top] }));
  return { host, other, ref: `oci:${join(work, dir)}:multi` };
}

describe("tagImage", () => {
  it("names a layout like a registry image, found with pullPolicy never and missing", async () => {
    const src = await layout("py", "tagged\n", { tag: "3-bookworm" });
    const events: TagProgress[] = [];
    const tagged = await tagImage(`oci:${join(work, "py")}:3-bookworm`, "python:3-bookworm", { home, onProgress: (p) => events.push(p) });
    expect(tagged).toEqual({ target: "docker.io/library/python:3-bookworm", manifestDigest: src.manifestDigest });
    expect(events.map((e) => e.phase === "copy" && `${e.kind}:${e.cached}`)).toEqual(["layer:false", "config:false", "manifest:false"]);
    for (const d of [src.manifestDigest, src.configDigest, ...src.layerDigests]) expect(existsSync(storeBlob(d)), d).toBe(true);
    expect(await readRef("docker.io/library/python:3-bookworm", home)).toMatchObject({ manifestDigest: src.manifestDigest, source: "tag" });

    const image = await resolveImage("python:3-bookworm", { pullPolicy: "never", home });
    expect(image.manifestDigest).toBe(src.manifestDigest);
    expect(image.config).toMatchObject({ cmd: ["/bin/sh"], env: ["PATH=/bin"] });
    expect(existsSync(image.rootfsPath)).toBe(true);
    // "missing" (Image.build's default) answers from the record too: no registry is reachable here.
    expect((await resolveImage("docker.io/library/python:3-bookworm", { home })).manifestDigest).toBe(src.manifestDigest);

    // Tagging again finds every blob in the store.
    events.length = 0;
    await tagImage(`oci:${join(work, "py")}:3-bookworm`, "python:3-bookworm", { home, onProgress: (p) => events.push(p) });
    expect(events.every((e) => e.phase === "copy" && e.cached)).toBe(true);
  });

  it("retags a tagged name, moves a name to another image, and lists tags", async () => {
    const a = await layout("a", "a\n");
    const b = await layout("b", "b\n");
    await tagImage(`oci:${join(work, "a")}`, "localhost/app:v1", { home });
    // A registry reference that is present locally is the source: no network.
    expect(await tagImage("localhost/app:v1", "localhost:5000/team/app", { home })).toEqual({ target: "localhost:5000/team/app:latest", manifestDigest: a.manifestDigest });
    expect((await resolveImage("localhost:5000/team/app:latest", { pullPolicy: "never", home })).manifestDigest).toBe(a.manifestDigest);

    await tagImage(`oci:${join(work, "b")}`, "localhost/app:v1", { home });
    expect((await resolveImage("localhost/app:v1", { pullPolicy: "never", home })).manifestDigest).toBe(b.manifestDigest);

    const listed = await listImages(home);
    expect(listed.map((i) => [i.ref, i.manifestDigest, i.source])).toEqual([
      ["localhost:5000/team/app:latest", a.manifestDigest, "tag"],
      ["localhost/app:v1", b.manifestDigest, "tag"],
    ]);
    expect(listed[0]!.blobBytes).toBeGreaterThan(0);
  });

  it("refuses bad targets before doing any work", async () => {
    await layout("img", "x\n");
    const src = `oci:${join(work, "img")}`;
    const cases: [string, string][] = [
      ["oci:./elsewhere", "REF_TAG_TARGET_INVALID"],
      ["builtin:busybox", "REF_TAG_TARGET_INVALID"],
      ["docker-archive:./x.tar", "REF_TAG_TARGET_INVALID"],
      [`app@sha256:${"a".repeat(64)}`, "REF_TAG_TARGET_DIGEST"],
      ["Upper/Case", "REF_INVALID"],
      ["app:bad tag", "REF_INVALID"],
      ["", "REF_INVALID"],
      ["https://example.com/app", "REF_UNSUPPORTED"],
    ];
    for (const [target, code] of cases) {
      const err = await tagImage(src, target, { home }).catch((e: unknown) => e);
      expect(err, target).toMatchObject({ code });
      expect((err as Error).message, target).toContain(JSON.stringify(target));
      expect((err as { hint?: string }).hint, target).toBeTruthy();
    }
    const digest = await tagImage(src, `app@sha256:${"a".repeat(64)}`, { home }).catch((e: { hint: string }) => e.hint);
    expect(digest).toBe("drop the digest: app:latest");
    expect(existsSync(join(home, "refs"))).toBe(false);
  });

  it("reports unknown sources and stores nothing from a corrupt layout", async () => {
    await expect(tagImage(`oci:${join(work, "none")}`, "app", { home })).rejects.toMatchObject({ code: "IMAGE_LAYOUT_NOT_FOUND" });
    const src = await layout("img", "x\n", { tag: "v1" });
    await expect(tagImage(`oci:${join(work, "img")}:v2`, "app", { home })).rejects.toMatchObject({ code: "IMAGE_TAG_NOT_FOUND" });
    await expect(tagImage("builtin:nope", "app", { home })).rejects.toMatchObject({ code: "REF_UNKNOWN_BUILTIN" });
    // A registry source that is not local is pulled: here from a port nothing listens on.
    await expect(tagImage("localhost:1/none:x", "app", { home })).rejects.toMatchObject({ code: "REGISTRY_UNREACHABLE" });

    const blob = await readFile(src.layerPaths[0]!);
    blob[blob.length - 1]! ^= 0xff; // same size, other content
    await writeFile(src.layerPaths[0]!, blob);
    await expect(tagImage(`oci:${join(work, "img")}:v1`, "app", { home })).rejects.toMatchObject({ code: "IMAGE_DIGEST_MISMATCH" });
    expect(existsSync(storeBlob(src.layerDigests[0]!))).toBe(false);
    expect(existsSync(storeBlob(src.manifestDigest))).toBe(false);
    expect(await readRef("docker.io/library/app:latest", home)).toBeUndefined();
  });

  it("picks the host platform from a multi-platform layout, another one when asked", async () => {
    const { host, other, ref } = await multiPlatformLayout("multi");
    expect((await tagImage(ref, "localhost/multi:host", { home })).manifestDigest).toBe(host.manifestDigest);
    const foreign = await tagImage(ref, "localhost/multi:other", { home, platform: { os: "linux", architecture: OTHER_ARCH } });
    expect(foreign.manifestDigest).toBe(other.manifestDigest);
    expect(existsSync(storeBlob(other.layerDigests[0]!))).toBe(true);

    await expect(tagImage(ref, "localhost/multi:s390x", { home, platform: { os: "linux", architecture: "s390x" } })).rejects.toMatchObject({
      code: "REGISTRY_PLATFORM_UNAVAILABLE",
    });
    // A single-platform source must match the platform asked for.
    await layout("single", "x\n");
    await expect(tagImage(`oci:${join(work, "single")}`, "localhost/single", { home, platform: { os: "linux", architecture: OTHER_ARCH } })).rejects.toMatchObject({
      code: "IMAGE_PLATFORM_MISMATCH",
    });
  });

  it("tags an image from a docker archive", async () => {
    const layer = await makeTar([{ name: "hello", data: "hi\n" }]);
    const config = Buffer.from(JSON.stringify({ architecture: HOST_ARCH, os: "linux", config: { Cmd: ["/hello"] }, rootfs: { type: "layers", diff_ids: [sha256(layer)] } }));
    const manifest = JSON.stringify([{ Config: "config.json", RepoTags: ["hello:1"], Layers: ["layer.tar"] }]);
    const file = join(work, "hello.tar");
    await writeFile(file, await makeTar([{ name: "layer.tar", data: layer }, { name: "config.json", data: config }, { name: "manifest.json", data: manifest }]));
    const tagged = await tagImage(`docker-archive:${file}`, "localhost/hello:1", { home });
    const image = await resolveImage("localhost/hello:1", { pullPolicy: "never", home });
    expect(image.manifestDigest).toBe(tagged.manifestDigest);
    expect(image.config.cmd).toEqual(["/hello"]);
  });

  it("rmi forgets the tag and what only it used, not the layout it came from", async () => {
    const src = await layout("img", "x\n");
    await tagImage(`oci:${join(work, "img")}`, "localhost/gone:1", { home });
    await tagImage(`oci:${join(work, "img")}`, "localhost/kept:1", { home });
    await resolveImage("localhost/gone:1", { pullPolicy: "never", home });

    const first = await removeImage("localhost/gone:1", home);
    expect(first.removed).toEqual(["localhost/gone:1"]);
    expect(first.blobsRemoved).toBe(0); // still used by localhost/kept:1
    await expect(resolveImage("localhost/gone:1", { pullPolicy: "never", home })).rejects.toMatchObject({ code: "IMAGE_NOT_PRESENT" });

    const second = await removeImage("localhost/kept:1", home);
    expect(second.removed).toEqual(["localhost/kept:1"]);
    expect(second.blobsRemoved).toBe(3);
    expect(second.imagesRemoved).toBe(1); // the root filesystem was built for a tag
    expect(existsSync(storeBlob(src.manifestDigest))).toBe(false);
    expect(existsSync(src.manifestPath)).toBe(true); // the layout is the user's
    expect(await listImages(home)).toEqual([]);
  });

  it("rmi of a tag keeps the root filesystem of the layout it was made from", async () => {
    await layout("img", "x\n");
    const built = await resolveImage(`oci:${join(work, "img")}`, { home });
    await tagImage(`oci:${join(work, "img")}`, "localhost/alias:1", { home });
    expect((await resolveImage("localhost/alias:1", { pullPolicy: "never", home })).rootfsPath).toBe(built.rootfsPath);
    const r = await removeImage("localhost/alias:1", home);
    expect(r).toMatchObject({ removed: ["localhost/alias:1"], blobsRemoved: 3, imagesRemoved: 0 });
    expect(existsSync(built.rootfsPath)).toBe(true);
  });
});
