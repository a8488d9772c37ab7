import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BlobStore } from "../../src/store/blobs.js";
import { parseDockerRef } from "../../src/oci/docker-ref.js";
import { TARGET_PLATFORM } from "../../src/oci/oci-layout.js";
import { pullImage, resolveDigest, type PullProgress } from "../../src/registry/index.js";
import { cleanupTemps, corruptBlobs, fixtures, freePort, removeDir, startRegistry, tempDir, tempStore, type Fixtures, type Registry } from "../helpers/registry.js";

afterAll(() => cleanupTemps());

let reg: Registry;
let fx: Fixtures;
const homes: string[] = [];

const newStore = () => tempStore(homes);

beforeAll(async () => {
  fx = await fixtures();
  reg = await startRegistry("plain");
  await reg.push(fx.busybox.layout, fx.busybox.tag, "test/busybox", "1.36");
  await reg.push(fx.multiarch.layout, fx.multiarch.tag, "test/multi", "latest", true);
});

afterAll(async () => {
  await reg?.stop();
  for (const h of homes) removeDir(h);
});

describe("pull from a plain HTTP registry", () => {
  it("pulls by tag into the store, verified, and a second pull downloads nothing", async () => {
    const store = newStore();
    const events: PullProgress[] = [];
    const ref = parseDockerRef(`${reg.host}/test/busybox:1.36`);
    const res = await pullImage(ref, { store, onProgress: (e) => events.push(e) });

    expect(res.registry).toBe(reg.host);
    expect(res.repository).toBe("test/busybox");
    expect(res.manifestDigest).toMatch(/^sha256:[a-f0-9]{64}$/);
    expect(res.indexDigest).toBeUndefined();
    expect(res.platform).toMatchObject({ os: "linux", architecture: TARGET_PLATFORM.architecture });
    expect(res.layers.length).toBeGreaterThan(0);
    const all = [res.manifestDigest, res.configDigest, ...res.layers.map((l) => l.digest)];
    for (const d of all) expect(await store.has(d)).toBe(true);
    expect(corruptBlobs(store.root, all)).toEqual([]);
    const manifest = JSON.parse(readFileSync(store.path(res.manifestDigest), "utf8"));
    expect(manifest.config.digest).toBe(res.configDigest);
    expect(manifest.layers.map((l: { digest: string }) => l.digest)).toEqual(res.layers.map((l) => l.digest));

    expect(events[0]).toEqual({ type: "manifest", ref: ref.canonical });
    const layerEvents = events.filter((e) => e.type === "layer");
    const last = layerEvents.at(-1)!;
    expect(last).toMatchObject({ cached: false, count: res.layers.length });
    expect(last.type === "layer" && last.bytes === last.total).toBe(true);
    const done = events.at(-1)!;
    expect(done.type).toBe("done");
    expect(done.type === "done" && done.bytes).toBe(res.layers.reduce((n, l) => n + l.size, 0) + manifest.config.size);

    const again: PullProgress[] = [];
    const res2 = await pullImage(ref, { store, onProgress: (e) => again.push(e) });
    expect(res2).toEqual(res);
    expect(again.filter((e) => e.type === "layer").every((e) => e.type === "layer" && e.cached)).toBe(true);
    expect(again.find((e) => e.type === "config")).toMatchObject({ cached: true });
    expect(again.at(-1)).toEqual({ type: "done", bytes: 0 });
    expect(readdirSync(join(store.root, "tmp"))).toEqual([]);
  });

  it("pulls by digest, and name:tag@digest uses the digest", async () => {
    const byTag = await pullImage(parseDockerRef(`${reg.host}/test/busybox:1.36`), { store: newStore() });
    const byDigest = await pullImage(parseDockerRef(`${reg.host}/test/busybox@${byTag.manifestDigest}`), { store: newStore() });
    expect(byDigest.manifestDigest).toBe(byTag.manifestDigest);
    // The tag does not exist: only the digest is used.
    const both = await pullImage(parseDockerRef(`${reg.host}/test/busybox:no-such-tag@${byTag.manifestDigest}`), { store: newStore() });
    expect(both.manifestDigest).toBe(byTag.manifestDigest);
  });

  it("resolveDigest says what the tag points at", async () => {
    const res = await pullImage(parseDockerRef(`${reg.host}/test/busybox:1.36`), { store: newStore() });
    expect(await resolveDigest(parseDockerRef(`${reg.host}/test/busybox:1.36`))).toBe(res.manifestDigest);
    expect(await resolveDigest(parseDockerRef(`${reg.host}/test/busybox@${res.manifestDigest}`))).toBe(res.manifestDigest);
  });

  it("unknown tag → REGISTRY_MANIFEST_UNKNOWN naming the reference", async () => {
    const err = await pullImage(parseDockerRef(`${reg.host}/test/busybox:nope`), { store: newStore() }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_MANIFEST_UNKNOWN" });
    expect((err as Error).message).toContain(`${reg.host}/test/busybox:nope`);
    const err2 = await resolveDigest(parseDockerRef(`${reg.host}/test/nothing-here:1`)).catch((e: unknown) => e);
    expect(err2).toMatchObject({ code: "REGISTRY_MANIFEST_UNKNOWN" });
  });

  it("a closed port → REGISTRY_UNREACHABLE", async () => {
    const port = await freePort();
    const err = await pullImage(parseDockerRef(`127.0.0.1:${port}/x/y:1`), { store: newStore() }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_UNREACHABLE" });
    expect((err as Error).message).toMatch(new RegExp(`^registry unreachable: 127\\.0\\.0\\.1:${port}\\b.*ECONNREFUSED`));
  });

  it("an already-aborted signal cancels the pull with nothing stored", async () => {
    const store = newStore();
    const err = await pullImage(parseDockerRef(`${reg.host}/test/busybox:1.36`), { store, signal: AbortSignal.abort() }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_ABORTED" });
    expect(await store.list()).toEqual([]);
  });

  it("aborting mid-download leaves no partial blob", async () => {
    const store = newStore();
    const ac = new AbortController();
    const err = await pullImage(parseDockerRef(`${reg.host}/test/busybox:1.36`), {
      store,
      signal: ac.signal,
      onProgress: (e) => {
        if (e.type === "layer" && !e.cached && e.bytes > 0) ac.abort();
      },
    }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_ABORTED" });
    const res = await pullImage(parseDockerRef(`${reg.host}/test/busybox:1.36`), { store: newStore() });
    for (const l of res.layers) expect(await store.has(l.digest)).toBe(false);
    expect(readdirSync(join(store.root, "tmp"))).toEqual([]);
  });
});

describe("multi-arch images", () => {
  const native = () => fx.multiarch.native;
  const foreign = () => fx.multiarch.foreign;

  it("picks the host platform by default and stores the index", async () => {
    const store = newStore();
    const res = await pullImage(parseDockerRef(`${reg.host}/test/multi`), { store });
    expect(res.indexDigest).toMatch(/^sha256:/);
    expect(res.platform).toMatchObject({ os: "linux", architecture: native() });
    expect(await store.has(res.indexDigest!)).toBe(true);
    expect(corruptBlobs(store.root, [res.indexDigest!, res.manifestDigest, res.configDigest])).toEqual([]);
    expect(await resolveDigest(parseDockerRef(`${reg.host}/test/multi`))).toBe(res.manifestDigest);
  });

  it("shares layers between images: a layer already in the store is not downloaded again", async () => {
    const store = newStore();
    const bb = await pullImage(parseDockerRef(`${reg.host}/test/busybox:1.36`), { store });
    const events: PullProgress[] = [];
    const multi = await pullImage(parseDockerRef(`${reg.host}/test/multi`), { store, onProgress: (e) => events.push(e) });
    const shared = bb.layers.map((l) => l.digest).filter((d) => multi.layers.some((m) => m.digest === d));
    expect(shared.length).toBeGreaterThan(0);
    for (const d of shared) {
      const ev = events.filter((e): e is Extract<PullProgress, { type: "layer" }> => e.type === "layer" && e.digest === d);
      expect(ev.length).toBeGreaterThan(0);
      expect(ev.every((e) => e.cached)).toBe(true);
    }
    const blobs = readdirSync(join(store.root, "blobs", "sha256"));
    expect(new Set(blobs).size).toBe(blobs.length);
  });

  it("picks another platform when asked", async () => {
    const store = newStore();
    const platform = { os: "linux", architecture: foreign() };
    const res = await pullImage(parseDockerRef(`${reg.host}/test/multi:latest`), { store, platform });
    expect(res.platform).toMatchObject(platform);
    const nativeRes = await pullImage(parseDockerRef(`${reg.host}/test/multi:latest`), { store });
    expect(res.manifestDigest).not.toBe(nativeRes.manifestDigest);
    expect(await resolveDigest(parseDockerRef(`${reg.host}/test/multi:latest`), { platform })).toBe(res.manifestDigest);
  });

  it("a platform that is not there → REGISTRY_PLATFORM_UNAVAILABLE listing the available ones", async () => {
    const err = await pullImage(parseDockerRef(`${reg.host}/test/multi`), { store: newStore(), platform: { os: "linux", architecture: "s390x" } }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_PLATFORM_UNAVAILABLE" });
    for (const p of fx.multiarch.platforms) expect((err as Error).message).toContain(p);
    expect((err as Error).message).toContain("linux/s390x");
  });

  it("a single-platform image for another platform → REGISTRY_PLATFORM_UNAVAILABLE", async () => {
    const err = await pullImage(parseDockerRef(`${reg.host}/test/busybox:1.36`), { store: newStore(), platform: { os: "linux", architecture: "riscv64" } }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_PLATFORM_UNAVAILABLE" });
    expect((err as Error).message).toContain(`linux/${TARGET_PLATFORM.architecture}`);
  });
});
