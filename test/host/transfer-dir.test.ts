// Export and import through a directory cache, on snapshots made without a VM: the artifact's
// shape, sharing between a parent and a child, nothing moved twice, sparse RAM, and refusals
// (a corrupted chunk, a foreign engine) that publish nothing.
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { exportSnapshots } from "../../src/transfer/index.js";
import { importSnapshots } from "../../src/project/cache.js";
import { decodeChunkIndex, digestOf, keyOfConfig } from "../helpers/transfer-format.js";
import { keyOf } from "../../src/schema/key.js";
import { homePaths } from "../../src/paths.js";
import type { LoadedSnapshot } from "../../src/store/snapshots.js";
import { cleanup, fakeImage, fakeSnapshot, inHome, leftovers, tempDir, type FakeImage } from "../helpers/transfer.js";

const src = tempDir("sm-transfer-src-");
let image: FakeImage;
let parent: LoadedSnapshot;
let child: LoadedSnapshot;
const parentChunks = Array.from({ length: 400 }, (_, i) => i * 3 + 1);

beforeAll(async () => {
  await inHome(src, async () => {
    image = fakeImage();
    parent = await fakeSnapshot({ name: "base", image, chunks: parentChunks });
    child = await fakeSnapshot({ name: "app", image, parent, chunks: [2, 4, 1, 7, 5000] });
  });
});
afterAll(cleanup);

interface Index {
  manifests: { digest: string; annotations: Record<string, string> }[];
}
const blob = (cache: string, d: string) => readFileSync(join(cache, "blobs", "sha256", d.slice(7)));
const readIndex = (cache: string) => JSON.parse(readFileSync(join(cache, "index.json"), "utf8")) as Index;
const manifestOf = (cache: string, key: string) => {
  const e = readIndex(cache).manifests.find((m) => m.annotations["dev.supermachine.key"] === key)!;
  return JSON.parse(blob(cache, e.digest).toString()) as { config: { digest: string }; layers: { mediaType: string; digest: string; annotations?: Record<string, string> }[]; annotations: Record<string, string> };
};
const chunkIndex = (cache: string, key: string, file: string) => {
  const l = manifestOf(cache, key).layers.find((x) => x.annotations?.["dev.supermachine.file"] === file)!;
  return decodeChunkIndex(blob(cache, l.digest), file);
};

describe("a directory cache", () => {
  it("stores a parent and its child as OCI artifacts sharing every unchanged chunk", async () => {
    const cache = tempDir("sm-cache-");
    const r = await exportSnapshots(cache, [child, parent]);
    expect(r.snapshots.map((s) => [s.name, s.status])).toEqual([["base", "exported"], ["app", "exported"]]);
    const idx = readIndex(cache);
    expect(JSON.parse(readFileSync(join(cache, "oci-layout"), "utf8"))).toEqual({ imageLayoutVersion: "1.0.0" });
    expect(idx.manifests.map((m) => m.annotations["dev.supermachine.name"])).toEqual(["base", "app"]);
    expect(idx.manifests[0]!.annotations["org.opencontainers.image.ref.name"]).toBe(`sm-${parent.meta.hash}`);
    const m = manifestOf(cache, child.meta.hash);
    expect(m.annotations).toMatchObject({ "dev.supermachine.key": child.meta.hash, "dev.supermachine.name": "app", "dev.supermachine.parent": parent.meta.hash, "dev.supermachine.image.digest": image.digest });
    expect(JSON.parse(m.annotations["dev.supermachine.engine"]!)).toEqual(child.meta.inputs.engine);
    // The config is meta.json without the machine-local rootfs path.
    const config = JSON.parse(blob(cache, m.config.digest).toString());
    expect(config.hash).toBe(child.meta.hash);
    expect(config.image.rootfs).toBeUndefined();
    expect(keyOfConfig(config)).toBe(child.meta.hash);

    // Blobs: every distinct chunk once, plus per snapshot its state, RAM index, config and
    // manifest, and once the rootfs index and image.json.
    const chunkDigests = new Set<string>();
    for (const k of [parent.meta.hash, child.meta.hash]) for (const f of ["ram", "rootfs.sqfs"]) for (const c of chunkIndex(cache, k, f).chunks) chunkDigests.add(c.blob);
    const blobs = readdirSync(join(cache, "blobs", "sha256"));
    expect(blobs.length).toBe(chunkDigests.size + 2 * 4 + 2);
    const pRam = chunkIndex(cache, parent.meta.hash, "ram");
    const cRam = chunkIndex(cache, child.meta.hash, "ram");
    expect(pRam.chunks.length).toBe(parentChunks.length + 2); // plus the duplicated page
    const pBlobs = new Set(pRam.chunks.map((c) => c.blob));
    expect(pBlobs.size).toBe(parentChunks.length + 1); // the duplicate is one blob
    const fresh = cRam.chunks.filter((c) => !pBlobs.has(c.blob));
    expect(fresh.length).toBe(5);
    expect(r.snapshots[1]!.chunksMoved).toBe(5);
    expect(r.snapshots[1]!.bytesMoved).toBeLessThan(r.snapshots[0]!.bytesMoved * 0.2);
    // Each chunk blob is named by the digest of its (compressed) bytes.
    expect(digestOf(blob(cache, fresh[0]!.blob))).toBe(fresh[0]!.blob);
  });

  it("moves nothing the second time, and imports into an empty home what it needs", async () => {
    const cache = tempDir("sm-cache-");
    await exportSnapshots(cache, [{ dir: parent.dir }, { dir: child.dir }]);
    const again = await exportSnapshots(cache, [parent, child]);
    expect(again.snapshots.map((s) => s.status)).toEqual(["present", "present"]);
    expect(again.chunksMoved).toBe(0);
    expect(again.bytesMoved).toBe(0);

    const home = tempDir("sm-home-");
    await inHome(home, async () => {
      // Asking for the child brings its parent first.
      const r = await importSnapshots(cache, [child.meta.hash]);
      expect(r.snapshots.map((s) => [s.name, s.status])).toEqual([["base", "imported"], ["app", "imported"]]);
      // The child's unchanged chunks came from the parent's local RAM file.
      expect(r.snapshots[1]!.chunksMoved).toBe(5);
      const snaps = join(homePaths().snapshots);
      const pDir = join(snaps, `base-${parent.meta.hash.slice(0, 16)}`);
      const cDir = join(snaps, `app-${child.meta.hash.slice(0, 16)}`);
      for (const [a, b] of [[parent.dir, pDir], [child.dir, cDir]] as const) {
        expect(readFileSync(join(b, "ram")).equals(readFileSync(join(a, "ram")))).toBe(true);
        expect(readFileSync(join(b, "state")).equals(readFileSync(join(a, "state")))).toBe(true);
        // Sparse: holes stay holes.
        expect(statSync(join(b, "ram")).blocks * 512).toBeLessThan(20 * 1024 * 1024);
        const meta = JSON.parse(readFileSync(join(b, "meta.json"), "utf8"));
        expect(meta.image.rootfs).toBe(join(homePaths().images, image.digest.slice(7), "rootfs.sqfs"));
        expect(meta.hash).toBe(keyOf(meta.inputs));
      }
      // The root filesystem came with them, byte for byte; image.json too, but for the facts this
      // machine records of its root filesystem (sha256 and mtime, as when built here).
      const entry = join(homePaths().images, image.digest.slice(7));
      const rootfsBytes = readFileSync(join(entry, "rootfs.sqfs"));
      expect(rootfsBytes.equals(readFileSync(image.rootfs))).toBe(true);
      const { sha256, rootfsMtimeNs, ...imported } = JSON.parse(readFileSync(join(entry, "image.json"), "utf8")) as Record<string, unknown>;
      const { sha256: _s, rootfsMtimeNs: _m, ...exported } = JSON.parse(readFileSync(join(image.rootfs, "..", "image.json"), "utf8")) as Record<string, unknown>;
      expect(imported).toEqual(exported);
      expect(sha256).toBe(createHash("sha256").update(rootfsBytes).digest("hex"));
      expect(rootfsMtimeNs).toBe(String(statSync(join(entry, "rootfs.sqfs"), { bigint: true }).mtimeNs));
      // Present now: nothing moves.
      const twice = await importSnapshots(cache, [parent.meta.hash, child.meta.hash]);
      expect(twice.snapshots.map((s) => s.status)).toEqual(["present", "present"]);
      expect(twice.bytesMoved).toBe(0);
      const missing = await importSnapshots(cache, ["0".repeat(64)]);
      expect(missing.snapshots[0]!.status).toBe("missing");
      expect(leftovers(home)).toEqual([]);
    });
  });

  it("keeps a private copy of the root filesystem when this machine built the image differently", async () => {
    const cache = tempDir("sm-cache-");
    await exportSnapshots(cache, [parent]);
    const home = tempDir("sm-home-");
    await inHome(home, async () => {
      // The same image digest, other bytes (sqfstar stamps the build time on the root).
      const entry = join(homePaths().images, image.digest.slice(7));
      mkdirSync(entry, { recursive: true });
      const other = readFileSync(image.rootfs);
      other[5]! ^= 0xff;
      writeFileSync(join(entry, "rootfs.sqfs"), other);
      writeFileSync(join(entry, "image.json"), JSON.stringify({ version: 1, manifestDigest: image.digest, sizeBytes: other.length }));
      const r = await importSnapshots(cache, [parent.meta.hash]);
      expect(r.snapshots[0]!.status).toBe("imported");
      const dir = join(homePaths().snapshots, `base-${parent.meta.hash.slice(0, 16)}`);
      const meta = JSON.parse(readFileSync(join(dir, "meta.json"), "utf8"));
      expect(meta.image.rootfs).toBe(join(dir, "rootfs.sqfs"));
      expect(readFileSync(meta.image.rootfs).equals(readFileSync(image.rootfs))).toBe(true);
      expect(readFileSync(join(entry, "rootfs.sqfs")).equals(other)).toBe(true); // left alone
    });
  });

  it("refuses a corrupted chunk and publishes nothing", async () => {
    const cache = tempDir("sm-cache-");
    await exportSnapshots(cache, [parent]);
    const victim = chunkIndex(cache, parent.meta.hash, "ram").chunks[10]!.blob;
    const path = join(cache, "blobs", "sha256", victim.slice(7));
    const bytes = readFileSync(path);
    bytes[bytes.length >> 1]! ^= 0x01;
    writeFileSync(path, bytes);
    const home = tempDir("sm-home-");
    await inHome(home, async () => {
      const err = await importSnapshots(cache, [parent.meta.hash]).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: "CACHE_DIGEST_MISMATCH", message: expect.stringContaining(victim) });
      expect(readdirSync(homePaths().snapshots)).toEqual([]);
      expect(leftovers(home)).toEqual([]);
    });
  });

  it("refuses a snapshot of another engine, naming the field", async () => {
    const cache = tempDir("sm-cache-");
    await exportSnapshots(cache, [parent]);
    // Rewrite the config's engine and every digest and key that depend on it, so that only the
    // engine check can tell.
    const idx = readIndex(cache);
    const entry = idx.manifests[0]!;
    const m = JSON.parse(blob(cache, entry.digest).toString());
    const config = JSON.parse(blob(cache, m.config.digest).toString());
    config.inputs.engine.kernelKey = "kernel-from-elsewhere";
    const key = keyOfConfig(config);
    config.hash = key;
    const put = (b: Buffer) => {
      const d = digestOf(b);
      writeFileSync(join(cache, "blobs", "sha256", d.slice(7)), b);
      return { digest: d, size: b.length };
    };
    m.config = { ...m.config, ...put(Buffer.from(JSON.stringify(config))) };
    m.annotations["dev.supermachine.key"] = key;
    const mb = put(Buffer.from(JSON.stringify(m)));
    Object.assign(entry, mb);
    entry.annotations["dev.supermachine.key"] = key;
    entry.annotations["org.opencontainers.image.ref.name"] = `sm-${key}`;
    writeFileSync(join(cache, "index.json"), JSON.stringify(idx));
    const home = tempDir("sm-home-");
    await inHome(home, async () => {
      const err = await importSnapshots(cache, [key]).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: "CACHE_ENGINE_MISMATCH", message: expect.stringMatching(/kernel is "kernel-from-elsewhere", this machine's is/) });
      expect(existsSync(homePaths().snapshots) ? readdirSync(homePaths().snapshots) : []).toEqual([]);
      expect(existsSync(homePaths().images) ? readdirSync(homePaths().images) : []).toEqual([]);
      expect(leftovers(home)).toEqual([]);
    });
  });
});
