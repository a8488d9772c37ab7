// Push and pull of snapshots through a real registry on loopback (Debian's docker-registry,
// plain HTTP), on snapshots made without a VM: missing blobs only, a tag per key, nothing moved
// the second time, the root filesystem restored by image digest.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { homePaths } from "../../src/paths.js";
import { recipeKeyOf } from "../../src/schema/host.js";
import type { LoadedSnapshot } from "../../src/store/snapshots.js";
import { exportSnapshots, openCache } from "../../src/transfer/index.js";
import { importSnapshots } from "../../src/project/cache.js";
import { importImage } from "../../src/transfer/import.js";
import { startProxy, startRegistry, type Registry } from "../helpers/registry.js";
import { cleanup, fakeImage, fakeSnapshot, inHome, leftovers, tempDir, type FakeImage , signed, trusted, TRUST } from "../helpers/transfer.js";

let reg: Registry;
let image: FakeImage;
let parent: LoadedSnapshot;
let child: LoadedSnapshot;

beforeAll(async () => {
  reg = await startRegistry("plain");
  await inHome(tempDir("sm-transfer-src-"), async () => {
    image = fakeImage();
    parent = await fakeSnapshot({ name: "base", image, chunks: Array.from({ length: 300 }, (_, i) => i * 2) });
    child = await fakeSnapshot({ name: "app", image, parent, chunks: [1, 3, 4000] });
  });
});
afterAll(async () => {
  await reg?.stop();
  cleanup();
});

describe("a registry cache", () => {
  it("pushes only missing blobs, tags each snapshot, and pulls back what a machine lacks", async () => {
    const repo = `${reg.host}/sm/cache`;
    // Through a counting proxy: what goes over the wire.
    const proxy = await startProxy(reg.host);
    try {
      const viaProxy = `${proxy.host}/sm/cache`;
      const first = await exportSnapshots(viaProxy, [parent], signed);
      expect(first.snapshots[0]).toMatchObject({ name: "base", status: "exported" });
      // Upload sessions start at the proxy (the registry then names itself in Location).
      const uploads = () => proxy.seen.filter((r) => r.method === "POST" && r.path.includes("/blobs/uploads/")).length;
      const parentUploads = uploads();
      // A pack of the root filesystem, one of the RAM and state, the rootfs index, image.json, the config.
      expect(parentUploads).toBe(5);
      expect(first.requests).toBeGreaterThan(0);
      const second = await exportSnapshots(viaProxy, [parent, child], signed);
      expect(second.snapshots.map((s) => s.status)).toEqual(["present", "exported"]);
      expect(second.snapshots[1]!.chunksMoved).toBe(3 + 1); // 3 chunks and the state
      expect(uploads() - parentUploads).toBe(2); // its pack and its config
      const third = await exportSnapshots(viaProxy, [parent, child], signed);
      expect(third.chunksMoved).toBe(0);
      expect(third.bytesMoved).toBe(0);
    } finally {
      await proxy.close();
    }
    const tags = JSON.parse(await (await fetch(`${reg.url}/v2/sm/cache/tags/list`)).text()) as { tags: string[] };
    // And each snapshot under its recipe key (its key without the host's part; a child's names its parent's).
    const parentRecipe = recipeKeyOf(parent.meta.inputs, null);
    const recipes = [`sm-recipe-${parentRecipe}`, `sm-recipe-${recipeKeyOf(child.meta.inputs, parentRecipe)}`];
    expect(tags.tags.sort()).toEqual([`sm-${child.meta.hash}`, `sm-${parent.meta.hash}`, `sm-image-${image.digest.slice(7)}`, ...recipes].sort());
    const backend = await openCache(repo);
    try {
      const byRecipe = await backend.readRecipeManifest(parentRecipe);
      expect(byRecipe && JSON.parse(byRecipe.toString()).annotations["dev.supermachine.key"]).toBe(parent.meta.hash);
    } finally {
      backend.close();
    }

    const home = tempDir("sm-home-");
    await inHome(home, async () => {
      // The root filesystem alone, by image digest (what a build needs before it has keys).
      const backend = await openCache(repo);
      try {
        expect(await importImage(backend, image.digest, TRUST)).toBe(true);
        expect(await importImage(backend, image.digest, TRUST)).toBe(false);
      } finally {
        backend.close();
      }
      const r = await importSnapshots(repo, [child.meta.hash], trusted);
      expect(r.snapshots.map((s) => [s.name, s.status])).toEqual([["base", "imported"], ["app", "imported"]]);
      expect(r.snapshots[1]!.chunksMoved).toBe(3);
      expect(r.requests).toBeLessThan(20);
      const dir = join(homePaths().snapshots, `app-${child.meta.hash.slice(0, 16)}`);
      expect(readFileSync(join(dir, "ram")).equals(readFileSync(child.ram))).toBe(true);
      expect((await importSnapshots(repo, [child.meta.hash], trusted)).snapshots[0]!.status).toBe("present");
      expect(leftovers(home)).toEqual([]);
    });
  });

  it("reports a snapshot the registry does not have as missing, and refuses a tag or digest as location", async () => {
    const r = await importSnapshots(`${reg.host}/sm/other`, ["1".repeat(64)], trusted);
    expect(r.snapshots[0]!.status).toBe("missing");
    await expect(exportSnapshots(`${reg.host}/sm/cache:v1`, [parent], signed)).rejects.toMatchObject({ code: "CACHE_LOCATION_INVALID" });
  });
});
