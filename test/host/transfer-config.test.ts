// Cache locations (directory or registry), the config's cache field, and the build's fetch hook
// on snapshots made without a VM.
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { recipeKeyOf } from "../../src/schema/host.js";
import { afterAll, describe, expect, it } from "vitest";
import { loadProject } from "../../src/config/loader.js";
import { exportSnapshots, parseCacheLocation } from "../../src/transfer/index.js";
import { fetchFromCache } from "../../src/project/cache.js";
import { loadSnapshot } from "../../src/store/snapshots.js";
import { cleanup, fakeImage, fakeSnapshot, inHome, tempDir , signed, trusted } from "../helpers/transfer.js";

afterAll(cleanup);

describe("cache locations", () => {
  it("tells directories from registry repositories", () => {
    expect(parseCacheLocation("/tmp/cache")).toEqual({ kind: "dir", path: "/tmp/cache" });
    expect(parseCacheLocation("./c", "/w")).toEqual({ kind: "dir", path: "/w/c" });
    expect(parseCacheLocation("cache", "/w")).toEqual({ kind: "dir", path: "/w/cache" });
    expect(parseCacheLocation("a/b", "/w")).toEqual({ kind: "dir", path: "/w/a/b" });
    expect(parseCacheLocation("127.0.0.1:5000/sm/cache")).toEqual({ kind: "registry", registry: "127.0.0.1:5000", repository: "sm/cache" });
    expect(parseCacheLocation("localhost/cache")).toEqual({ kind: "registry", registry: "localhost", repository: "cache" });
    expect(parseCacheLocation("ghcr.io/me/sm-cache")).toEqual({ kind: "registry", registry: "ghcr.io", repository: "me/sm-cache" });
    expect(parseCacheLocation("docker://me/cache")).toEqual({ kind: "registry", registry: "docker.io", repository: "me/cache" });
    expect(() => parseCacheLocation("ghcr.io/me/cache:v1")).toThrow(expect.objectContaining({ code: "CACHE_LOCATION_INVALID" }));
    expect(() => parseCacheLocation("ghcr.io/Me/cache")).toThrow(expect.objectContaining({ code: "CACHE_LOCATION_INVALID" }));
  });

  it("resolves the config's cache directories against the config file", async () => {
    const root = tempDir("sm-cache-config-");
    mkdirSync(join(root, "sub"));
    writeFileSync(join(root, "img.ts"), 'export default { ref: "builtin:busybox" };\n');
    writeFileSync(join(root, "supermachine.config.ts"), 'export default { images: ["./img.ts"], cache: { from: "./shared-cache", to: "127.0.0.1:5000/team/cache" } };\n');
    const p = await loadProject({ cwd: join(root, "sub") });
    expect(p.cache).toEqual({ from: join(root, "shared-cache"), to: "127.0.0.1:5000/team/cache" });
    writeFileSync(join(root, "supermachine.config.ts"), 'export default { images: ["./img.ts"], cache: { form: "x" } };\n');
    await expect(loadProject({ cwd: root })).rejects.toMatchObject({ code: "OPTION_UNKNOWN", message: expect.stringContaining("form") });
  });
});

describe("the build's fetch hook", () => {
  it("publishes a snapshot at the directory the build asks for, or says the cache lacks it", async () => {
    const cache = tempDir("sm-cache-");
    const snap = await inHome(tempDir("sm-src-"), async () => {
      const image = fakeImage();
      const s = await fakeSnapshot({ name: "base", image, chunks: [0, 5, 9] });
      await exportSnapshots(cache, [s], signed);
      return s;
    });
    const home = tempDir("sm-home-");
    await inHome(home, async () => {
      const fetch = fetchFromCache(cache, undefined, trusted);
      const dir = join(home, "project-snapshots", "renamed-abc");
      const expect_ = { workload: snap.meta.workload, image: { digest: snap.meta.image.digest, config: snap.meta.image.config } };
      const req = { name: "base", key: snap.meta.hash, recipeKey: recipeKeyOf(snap.meta.inputs, null), dir, inputs: snap.meta.inputs, sources: snap.meta.sources!, expect: expect_ };
      // A snapshot that would run something else than this build computed is refused, whatever its key.
      const other = { ...req, expect: { ...expect_, workload: { argv: ["sh", "-c", "evil"], env: [], cwd: "/" } } };
      await expect(fetch(other)).rejects.toMatchObject({ code: "CACHE_KEY_MISMATCH", message: expect.stringContaining("its workload (command, environment, directory or user) is not the one this project declares") });
      expect(await fetch(req)).toBe(true);
      expect((await loadSnapshot(dir, snap.meta.hash))?.meta.hash).toBe(snap.meta.hash);
      expect(await fetch(req)).toBe(true); // present
      // A key the cache lacks, whose recipe it has as made on this very host: a plain miss.
      expect(await fetch({ ...req, key: "f".repeat(64), dir: join(home, "x") })).toBe(false);
    });
  });
});
