import { execFileSync } from "node:child_process";
import { readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { BlobStore } from "../../src/store/blobs.js";
import { archivePath, importDockerArchive } from "../../src/image/docker-archive.js";
import { planFlatten, streamFlattened } from "../../src/image/flatten.js";
import { loadImage, selectManifestByDigest } from "../../src/oci/oci-layout.js";
import { resolveImage } from "../../src/image/resolve.js";
import { makeTar, readTar, removeDir, sha256, tempDir, writeLayout, zstdCompress, type TestEntry } from "../helpers/image.js";
import { runOk } from "../helpers/run.js";

let home: string;
let work: string;
let store: BlobStore;
beforeEach(async () => {
  home = await tempDir("sm-home-");
  work = await tempDir("sm-archive-");
  store = BlobStore.open(home);
});
afterEach(async () => {
  await removeDir(home);
  await removeDir(work);
});

const ARCH = process.arch === "arm64" ? "arm64" : "amd64";
const unsquashfs = (...args: string[]) => execFileSync("unsquashfs", args, { encoding: "utf8" });

/** Reads an imported image back from the store (an OCI layout) and flattens it. */
async function readBack(digest: string, ref: string) {
  const image = await loadImage(await selectManifestByDigest(store.root, digest, ref), ref);
  const plan = await planFlatten(image.layers, { ref });
  const files = await readTar(streamFlattened(plan, { ref }));
  return { image, files: Object.fromEntries(files.map((f) => [f.name.replace(/\/$/, ""), f])) };
}

/** Two layers (gzip + plain) and a config, as an OCI layout tagged v1. */
async function sourceLayout() {
  const layout = join(work, "layout");
  const l1 = await makeTar([{ name: "bin/", type: "directory" }, { name: "bin/hello", data: "#!/bin/sh\necho hi\n", mode: 0o755 }, { name: "etc/", type: "directory" }, { name: "etc/old", data: "old" }]);
  const l2 = await makeTar([{ name: "etc/.wh.old" }, { name: "etc/motd", data: "from archive\n" }]);
  const written = await writeLayout(layout, { layers: [{ tar: l1, gzip: true }, { tar: l2 }], tag: "v1", config: { Cmd: ["/bin/hello"], Env: ["A=1"] } });
  return { layout, diffIds: [sha256(l1), sha256(l2)], ...written };
}

/** Builds a (docker save style) archive from entries, in order. */
const archive = (entries: TestEntry[]) => makeTar(entries);

const configJson = (diffIds: string[], cmd = ["sh"]) =>
  Buffer.from(JSON.stringify({ architecture: ARCH, os: "linux", config: { Cmd: cmd }, rootfs: { type: "layers", diff_ids: diffIds } }));

/**
 * A legacy `docker save` archive of two images sharing a layer: `<id>/layer.tar` files (one a
 * symlink to the other), `<hex>.json` configs, and manifest.json written last.
 */
async function legacyArchive() {
  const shared = await makeTar([{ name: "bin/", type: "directory" }, { name: "bin/sh", data: "shell\n", mode: 0o755 }]);
  const onlyB = await makeTar([{ name: "b", data: "image b\n" }]);
  const cfgA = configJson([sha256(shared)], ["sh", "-a"]);
  const cfgB = configJson([sha256(shared), sha256(onlyB)], ["sh", "-b"]);
  const file = join(work, "legacy.tar");
  await writeFile(
    file,
    await archive([
      { name: "aaaa/", type: "directory" },
      { name: "aaaa/VERSION", data: "1.0" },
      { name: "aaaa/layer.tar", data: shared },
      { name: "bbbb/", type: "directory" },
      { name: "bbbb/layer.tar", type: "symlink", linkname: "../aaaa/layer.tar" },
      { name: "cccc/", type: "directory" },
      { name: "cccc/layer.tar", data: onlyB },
      { name: `${sha256(cfgA).slice(7)}.json`, data: cfgA },
      { name: `${sha256(cfgB).slice(7)}.json`, data: cfgB },
      { name: "repositories", data: "{}" },
      {
        name: "manifest.json",
        data: JSON.stringify([
          { Config: `${sha256(cfgA).slice(7)}.json`, RepoTags: ["busybox:latest"], Layers: ["aaaa/layer.tar"] },
          { Config: `${sha256(cfgB).slice(7)}.json`, RepoTags: ["example.com/team/app:1.2", "app:latest"], Layers: ["bbbb/layer.tar", "cccc/layer.tar"] },
        ]),
      },
    ]),
  );
  return { file, shared, onlyB };
}

async function expectArchiveError(file: string, code: string, parts: string[], name?: string): Promise<void> {
  const err = (await importDockerArchive(file, { store, ref: `docker-archive:${file}`, ...(name !== undefined ? { name } : {}) }).catch((e: unknown) => e)) as Error;
  expect(err).toMatchObject({ name: "ImageError", code });
  expect(err.message).toContain(file);
  for (const p of parts) expect(err.message).toContain(p);
  expect(await readdir(join(store.root, "tmp"))).toEqual([]); // no partial blob left behind
}

describe("importDockerArchive", () => {
  it("imports a skopeo docker-archive and reads it back through the store layout", async () => {
    const src = await sourceLayout();
    const file = join(work, "image.tar");
    await runOk("skopeo", ["copy", "-q", `oci:${src.layout}:v1`, `docker-archive:${file}:foo/bar:v1`]);

    const ref = `docker-archive:${file}`;
    const imported = await importDockerArchive(file, { store, ref });
    expect(imported.repoTags).toEqual(["docker.io/foo/bar:v1"]);
    expect(imported.config).toEqual({ env: ["A=1"], cmd: ["/bin/hello"], exposedPorts: [], labels: {} });

    const { image, files } = await readBack(imported.manifestDigest, ref);
    expect(image.digest).toBe(imported.manifestDigest);
    expect(image.mediaType).toBe("application/vnd.oci.image.manifest.v1+json");
    expect(image.configDescriptor).toMatchObject({ mediaType: "application/vnd.oci.image.config.v1+json", digest: src.configDigest });
    // skopeo stores layers uncompressed: their digests are the diff_ids.
    expect(image.layers.map((l) => [l.digest, l.mediaType])).toEqual(src.diffIds.map((d) => [d, "application/vnd.oci.image.layer.v1.tar"]));
    expect(files["bin/hello"]?.data).toBe("#!/bin/sh\necho hi\n");
    expect(files["etc/motd"]?.data).toBe("from archive\n");
    expect(files["etc/old"]).toBeUndefined();

    // Same image again, under a normalised name: same manifest, nothing re-stored.
    const before = await store.list();
    const again = await importDockerArchive(file, { store, ref, name: "docker.io/foo/bar:v1" });
    expect(again.manifestDigest).toBe(imported.manifestDigest);
    expect((await store.list()).sort()).toEqual(before.sort());
  });

  it("resolves docker-archive: references end to end", async () => {
    const src = await sourceLayout();
    const file = join(work, "image.tar");
    await runOk("skopeo", ["copy", "-q", `oci:${src.layout}:v1`, `docker-archive:${file}:foo/bar:v1`]);
    const image = await resolveImage(`docker-archive:${file}:foo/bar:v1`, { home });
    expect(image.config.cmd).toEqual(["/bin/hello"]);
    expect(unsquashfs("-cat", image.rootfsPath, "etc/motd")).toBe("from archive\n");
  });

  it("reads a legacy archive with manifest.json last, symlinked layers and several images", async () => {
    const { file, shared, onlyB } = await legacyArchive();
    const ref = `docker-archive:${file}`;
    await expectArchiveError(file, "IMAGE_ARCHIVE_AMBIGUOUS", ["holds 2 images", "busybox:latest", "example.com/team/app:1.2, app:latest"]);

    const a = await importDockerArchive(file, { store, ref, name: "busybox" }); // = docker.io/library/busybox:latest
    expect(a.repoTags).toEqual(["busybox:latest"]);
    expect(a.config.cmd).toEqual(["sh", "-a"]);
    const viaCanonical = await importDockerArchive(file, { store, ref, name: "docker.io/library/busybox:latest" });
    expect(viaCanonical.manifestDigest).toBe(a.manifestDigest);

    const b = await importDockerArchive(file, { store, ref, name: "app" }); // docker.io/library/app:latest
    expect(b.config.cmd).toEqual(["sh", "-b"]);
    const { image, files } = await readBack(b.manifestDigest, ref);
    expect(image.layers.map((l) => l.digest)).toEqual([sha256(shared), sha256(onlyB)]);
    expect(files["bin/sh"]?.data).toBe("shell\n");
    expect(files["b"]?.data).toBe("image b\n");
    expect((await importDockerArchive(file, { store, ref, name: "@1" })).manifestDigest).toBe(b.manifestDigest);
    expect((await importDockerArchive(file, { store, ref, name: "example.com/team/app:1.2" })).manifestDigest).toBe(b.manifestDigest);

    await expectArchiveError(file, "IMAGE_ARCHIVE_TAG_NOT_FOUND", ['"busybox:1.36"', "busybox:latest"], "busybox:1.36");
  });

  it("reads an OCI-style archive (docker >= 25) with gzip and zstd blobs", async () => {
    const l1 = await makeTar([{ name: "one", data: "1" }]);
    const l2 = await makeTar([{ name: "two", data: "2" }]);
    const l3 = await makeTar([{ name: "three", data: "3" }]);
    const blobs = [gzipSync(l1), zstdCompress(l2), l3];
    const cfg = configJson([sha256(l1), sha256(l2), sha256(l3)]);
    const path = (b: Buffer) => `blobs/sha256/${sha256(b).slice(7)}`;
    const file = join(work, "oci-style.tar");
    await writeFile(
      file,
      await archive([
        { name: "blobs/", type: "directory" },
        { name: "blobs/sha256/", type: "directory" },
        ...blobs.map((b) => ({ name: path(b), data: b })),
        { name: path(cfg), data: cfg },
        { name: "oci-layout", data: '{"imageLayoutVersion":"1.0.0"}' },
        { name: "index.json", data: "{}" },
        { name: "manifest.json", data: JSON.stringify([{ Config: path(cfg), RepoTags: ["img:1"], Layers: blobs.map(path) }]) },
      ]),
    );
    const ref = `docker-archive:${file}`;
    const imported = await importDockerArchive(file, { store, ref });
    const { image, files } = await readBack(imported.manifestDigest, ref);
    expect(image.layers.map((l) => [l.digest, l.mediaType])).toEqual([
      [sha256(blobs[0]!), "application/vnd.oci.image.layer.v1.tar+gzip"],
      [sha256(blobs[1]!), "application/vnd.oci.image.layer.v1.tar+zstd"],
      [sha256(blobs[2]!), "application/vnd.oci.image.layer.v1.tar"],
    ]);
    expect(Object.keys(files).sort()).toEqual(["one", "three", "two"]);
  });

  it("reads a gzip-compressed archive (docker save | gzip)", async () => {
    const { file } = await legacyArchive();
    const gz = join(work, "legacy.tar.gz");
    await writeFile(gz, gzipSync(await readFile(file)));
    const imported = await importDockerArchive(gz, { store, ref: "x", name: "busybox:latest" });
    expect(imported.repoTags).toEqual(["busybox:latest"]);
  });
});

describe("invalid archives", () => {
  const layer = () => makeTar([{ name: "f", data: "f" }]);

  async function write(entries: TestEntry[]): Promise<string> {
    const file = join(work, "bad.tar");
    await writeFile(file, await archive(entries));
    return file;
  }

  it("reports a missing file", async () => {
    await expectArchiveError(join(work, "nope.tar"), "IMAGE_ARCHIVE_NOT_FOUND", ["nope.tar"]);
  });

  it("refuses a file that is not a tar", async () => {
    const file = join(work, "bad.tar");
    await writeFile(file, Buffer.alloc(4096, 0x41));
    await expectArchiveError(file, "IMAGE_ARCHIVE_INVALID", ["not a valid tar archive"]);
  });

  it("refuses a truncated archive", async () => {
    const { file } = await legacyArchive();
    const data = await readFile(file);
    await writeFile(file, data.subarray(0, 3000));
    await expectArchiveError(file, "IMAGE_ARCHIVE_INVALID", ["not a valid tar archive", "Unexpected end of data"]);
  });

  it("refuses an archive without manifest.json", async () => {
    await expectArchiveError(await write([{ name: "layer.tar", data: await layer() }]), "IMAGE_ARCHIVE_INVALID", ["no manifest.json"]);
  });

  it("refuses a malformed manifest.json", async () => {
    await expectArchiveError(await write([{ name: "manifest.json", data: '{"Config": 1}' }]), "IMAGE_ARCHIVE_INVALID", ["manifest.json is not a non-empty array"]);
    await expectArchiveError(await write([{ name: "manifest.json", data: "[{" }]), "IMAGE_ARCHIVE_INVALID", ["not valid JSON"]);
  });

  it("refuses entries with '..' paths", async () => {
    await expectArchiveError(await write([{ name: "../../evil", data: "x" }]), "IMAGE_ARCHIVE_INVALID", ['"../../evil"', "leaves the archive"]);
  });

  it("refuses symlinks leaving the archive", async () => {
    const file = await write([{ name: "l/", type: "directory" }, { name: "l/layer.tar", type: "symlink", linkname: "../../etc/passwd" }]);
    await expectArchiveError(file, "IMAGE_ARCHIVE_INVALID", ['"l/layer.tar"', "../../etc/passwd", "outside the archive"]);
  });

  it("refuses manifest.json paths leaving the archive or missing", async () => {
    const cfg = configJson([]);
    const escaping = await write([
      { name: "c.json", data: cfg },
      { name: "manifest.json", data: JSON.stringify([{ Config: "c.json", RepoTags: null, Layers: ["../layer.tar"] }]) },
    ]);
    await expectArchiveError(escaping, "IMAGE_ARCHIVE_INVALID", ['"../layer.tar"', "outside the archive"]);
    const missing = await write([
      { name: "c.json", data: cfg },
      { name: "manifest.json", data: JSON.stringify([{ Config: "c.json", RepoTags: null, Layers: ["gone/layer.tar"] }]) },
    ]);
    await expectArchiveError(missing, "IMAGE_ARCHIVE_INVALID", ['"gone/layer.tar"', "not in the archive"]);
  });

  it("refuses a blob whose content does not match its blobs/sha256 name", async () => {
    const l = await layer();
    const cfg = configJson([sha256(l)]);
    const wrong = `blobs/sha256/${"0".repeat(64)}`;
    const file = await write([
      { name: wrong, data: l },
      { name: "c.json", data: cfg },
      { name: "manifest.json", data: JSON.stringify([{ Config: "c.json", RepoTags: [], Layers: [wrong] }]) },
    ]);
    await expectArchiveError(file, "IMAGE_ARCHIVE_INVALID", [wrong, `hashes to ${sha256(l)}`]);
  });

  it("refuses a layer that does not match the config's diff_id", async () => {
    const l = await layer();
    const cfg = configJson([sha256("something else")]);
    const file = await write([
      { name: "x/layer.tar", data: l },
      { name: "c.json", data: cfg },
      { name: "manifest.json", data: JSON.stringify([{ Config: "c.json", RepoTags: [], Layers: ["x/layer.tar"] }]) },
    ]);
    await expectArchiveError(file, "IMAGE_ARCHIVE_INVALID", ["x/layer.tar", "diff_id"]);
  });
});

describe("archivePath", () => {
  it("normalises and refuses escapes", () => {
    expect(archivePath("./a//b/./c")).toBe("a/b/c");
    expect(archivePath("/abs/x")).toBe("abs/x");
    expect(archivePath("a/../b")).toBe("b");
    expect(archivePath("a/../../b")).toBeNull();
  });
});
