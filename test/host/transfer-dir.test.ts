// Export and import through a directory cache, on snapshots made without a VM: the artifact's
// shape, sharing between a parent and a child, nothing moved twice, sparse RAM, and refusals
// (a corrupted chunk, a foreign engine) that publish nothing.
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { exportSnapshots } from "../../src/transfer/index.js";
import { importSnapshots } from "../../src/project/cache.js";
import { blob, blobPath, configOf, digestOf, keyOfConfig, manifestOf, readIndex, rewriteEntry, rootfsIndexOf } from "../helpers/transfer-format.js";
import { keyOf } from "../../src/schema/key.js";
import { homePaths } from "../../src/paths.js";
import type { LoadedSnapshot } from "../../src/store/snapshots.js";
import { cleanup, fakeImage, fakeSnapshot, inHome, leftovers, tempDir, type FakeImage , signed, SIGNING, trusted } from "../helpers/transfer.js";

const src = tempDir("sm-transfer-src-");
let image: FakeImage;
let parent: LoadedSnapshot;
let child: LoadedSnapshot;
const parentChunks = Array.from({ length: 400 }, (_, i) => i * 3 + 1);

beforeAll(async () => {
  await inHome(src, async () => {
    image = fakeImage();
    parent = await fakeSnapshot({ name: "base", image, chunks: parentChunks });
    child = await fakeSnapshot({ name: "app", image, parent, chunks: [2, 4, 1, 7, 4001] });
  });
});
afterAll(cleanup);

describe("a directory cache", () => {
  it("stores a parent and its child as OCI artifacts in packs, the child referencing its parent's packs", async () => {
    const cache = tempDir("sm-cache-");
    const r = await exportSnapshots(cache, [child, parent], signed);
    expect(r.snapshots.map((s) => [s.name, s.status])).toEqual([["base", "exported"], ["app", "exported"]]);
    const idx = readIndex(cache);
    expect(JSON.parse(readFileSync(join(cache, "oci-layout"), "utf8"))).toEqual({ imageLayoutVersion: "1.0.0" });
    expect(idx.manifests.map((m) => m.annotations["dev.supermachine.name"])).toEqual(["base", "app"]);
    expect(idx.manifests[0]!.annotations["org.opencontainers.image.ref.name"]).toBe(`sm-${parent.meta.hash}`);
    const pm = manifestOf(cache, parent.meta.hash);
    const m = manifestOf(cache, child.meta.hash);
    expect(m.artifactType).toBe("application/vnd.supermachine.snapshot.v2");
    expect(m.annotations).toMatchObject({ "dev.supermachine.key": child.meta.hash, "dev.supermachine.name": "app", "dev.supermachine.parent": parent.meta.hash, "dev.supermachine.image.digest": image.digest });
    expect(JSON.parse(m.annotations["dev.supermachine.engine"]!)).toEqual(child.meta.inputs.engine);
    // The config: meta.json without the machine-local rootfs path, the state's frame, the RAM index.
    const config = configOf(cache, child.meta.hash);
    expect(config.snapshot.hash).toBe(child.meta.hash);
    expect(config.snapshot.image.rootfs).toBeUndefined();
    expect(keyOfConfig(config.snapshot)).toBe(child.meta.hash);

    // A handful of layers, not one per chunk: the rootfs index, image.json and the packs.
    const packsOf = (x: typeof m) => x.layers.filter((l) => l.mediaType === "application/vnd.supermachine.pack.v2").map((l) => l.digest);
    expect(pm.layers.length).toBeLessThan(10);
    // The child lists every pack of its parent (a registry's garbage collection keeps them) and adds one.
    const pPacks = packsOf(pm);
    const cPacks = packsOf(m);
    expect(cPacks.slice(0, pPacks.length)).toEqual(pPacks);
    expect(cPacks.length).toBe(pPacks.length + 1);
    const pRam = configOf(cache, parent.meta.hash).ram;
    const cRam = config.ram;
    expect(pRam.chunks.length).toBe(parentChunks.length + 2); // plus the duplicated page
    expect(new Set(pRam.chunks.map((c) => c[4])).size).toBe(parentChunks.length + 1);
    // The duplicate page is one frame.
    const dup = pRam.chunks.filter((c) => c[0] === 3000 * 16384 || c[0] === 3001 * 16384);
    expect(dup[0]!.slice(1, 4)).toEqual(dup[1]!.slice(1, 4));
    // The child's own pack holds its 5 new chunks and its state; the rest are its parent's frames.
    const own = cPacks[cPacks.length - 1]!;
    const inOwn = cRam.chunks.filter((c) => cRam.packs[c[1]] === own);
    expect(inOwn.length).toBe(5);
    expect(config.state.pack).toBe(own);
    expect(r.snapshots[1]!.chunksMoved).toBe(5 + 1); // the chunks and the state's frame
    expect(r.snapshots[1]!.bytesMoved).toBeLessThan(r.snapshots[0]!.bytesMoved * 0.2);
    // Each blob is named by the digest of its bytes.
    expect(digestOf(blob(cache, own))).toBe(own);
    // The root filesystem's index records the file's sha256, and the manifest annotates it.
    const rix = rootfsIndexOf(cache, parent.meta.hash);
    expect(rix.sha256).toBe(createHash("sha256").update(readFileSync(image.rootfs)).digest("hex"));
    expect(pm.layers.find((l) => l.mediaType.includes("file-index"))!.annotations!["dev.supermachine.sha256"]).toBe(rix.sha256);
  });

  it("moves nothing the second time, and imports into an empty home what it needs", async () => {
    const cache = tempDir("sm-cache-");
    await exportSnapshots(cache, [{ dir: parent.dir }, { dir: child.dir }], signed);
    const again = await exportSnapshots(cache, [parent, child], signed);
    expect(again.snapshots.map((s) => s.status)).toEqual(["present", "present"]);
    expect(again.chunksMoved).toBe(0);
    expect(again.bytesMoved).toBe(0);

    const home = tempDir("sm-home-");
    await inHome(home, async () => {
      // Asking for the child brings its parent first.
      const r = await importSnapshots(cache, [child.meta.hash], trusted);
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
      const twice = await importSnapshots(cache, [parent.meta.hash, child.meta.hash], trusted);
      expect(twice.snapshots.map((s) => s.status)).toEqual(["present", "present"]);
      expect(twice.bytesMoved).toBe(0);
      const missing = await importSnapshots(cache, ["0".repeat(64)], trusted);
      expect(missing.snapshots[0]!.status).toBe("missing");
      expect(leftovers(home)).toEqual([]);
    });
  });

  it("keeps a private copy of the root filesystem when this machine built the image differently", async () => {
    const cache = tempDir("sm-cache-");
    await exportSnapshots(cache, [parent], signed);
    const home = tempDir("sm-home-");
    await inHome(home, async () => {
      // The same image digest, other bytes (sqfstar stamps the build time on the root).
      const entry = join(homePaths().images, image.digest.slice(7));
      mkdirSync(entry, { recursive: true });
      const other = readFileSync(image.rootfs);
      other[5]! ^= 0xff;
      writeFileSync(join(entry, "rootfs.sqfs"), other);
      writeFileSync(join(entry, "image.json"), JSON.stringify({ version: 1, manifestDigest: image.digest, sizeBytes: other.length }));
      const r = await importSnapshots(cache, [parent.meta.hash], trusted);
      expect(r.snapshots[0]!.status).toBe("imported");
      const dir = join(homePaths().snapshots, `base-${parent.meta.hash.slice(0, 16)}`);
      const meta = JSON.parse(readFileSync(join(dir, "meta.json"), "utf8"));
      expect(meta.image.rootfs).toBe(join(dir, "rootfs.sqfs"));
      expect(readFileSync(meta.image.rootfs).equals(readFileSync(image.rootfs))).toBe(true);
      expect(readFileSync(join(entry, "rootfs.sqfs")).equals(other)).toBe(true); // left alone
    });
  });

  it("refuses a corrupted pack and publishes nothing", async () => {
    const cache = tempDir("sm-cache-");
    await exportSnapshots(cache, [parent], signed);
    const ram = configOf(cache, parent.meta.hash).ram;
    const [, pack, at, size] = ram.chunks[10]!;
    const path = blobPath(cache, ram.packs[pack]!);
    const bytes = readFileSync(path);
    bytes[at + (size >> 1)]! ^= 0x01;
    writeFileSync(path, bytes);
    const home = tempDir("sm-home-");
    await inHome(home, async () => {
      const err = await importSnapshots(cache, [parent.meta.hash], trusted).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: expect.stringMatching(/^CACHE_(CHUNK_CORRUPT|DIGEST_MISMATCH)$/), message: expect.stringContaining(`of snapshot base (key ${parent.meta.hash.slice(0, 16)})`) });
      expect(readdirSync(homePaths().snapshots)).toEqual([]);
      expect(leftovers(home)).toEqual([]);
    });
  });

  it("refuses a snapshot of another engine, naming the field", async () => {
    const cache = tempDir("sm-cache-");
    await exportSnapshots(cache, [parent], signed);
    // Rewrite the config's engine and every digest and key that depend on it, so that only the
    // engine check can tell.
    const key = rewriteEntry(cache, parent.meta.hash, (config) => {
      config.snapshot.inputs.engine.kernelKey = "kernel-from-elsewhere";
      config.snapshot.hash = keyOfConfig(config.snapshot);
      return config.snapshot.hash;
    }, SIGNING); // signed by a trusted key: a trusted machine set up otherwise

    const home = tempDir("sm-home-");
    await inHome(home, async () => {
      const err = await importSnapshots(cache, [key], trusted).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: "CACHE_ENGINE_MISMATCH", message: expect.stringMatching(/kernel is "kernel-from-elsewhere", this machine's is/) });
      expect(existsSync(homePaths().snapshots) ? readdirSync(homePaths().snapshots) : []).toEqual([]);
      expect(existsSync(homePaths().images) ? readdirSync(homePaths().images) : []).toEqual([]);
      expect(leftovers(home)).toEqual([]);
    });
  });

  it("refuses a cache of format version 1 by name, saying what to do", async () => {
    const cache = tempDir("sm-cache-");
    await exportSnapshots(cache, [parent], signed);
    rewriteEntry(cache, parent.meta.hash, (_config, m) => void (m.artifactType = "application/vnd.supermachine.snapshot.v1"));
    const home = tempDir("sm-home-");
    await inHome(home, async () => {
      const err = await importSnapshots(cache, [parent.meta.hash], trusted).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: "CACHE_FORMAT_VERSION", message: expect.stringContaining("cache format version 1"), hint: expect.stringContaining("export the snapshot again") });
      expect(existsSync(homePaths().snapshots) ? readdirSync(homePaths().snapshots) : []).toEqual([]);
    });
    // An export with this version replaces the old entry under the same key.
    const again = await exportSnapshots(cache, [parent], signed);
    expect(again.snapshots[0]!.status).toBe("exported");
    expect(manifestOf(cache, parent.meta.hash).artifactType).toBe("application/vnd.supermachine.snapshot.v2");
  });
});
