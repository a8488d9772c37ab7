// publish(): one entry written once by concurrent writers, failures and crashes leave nothing a
// later check would trust, and one lock-timeout error. Real temp directories, no mocks.
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readdir, readFile, rm, utimes, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { StoreError } from "../../src/index.js";
import { acquireLock } from "../../src/store/lock.js";
import { publish, type PublishRequest } from "../../src/store/publish.js";

let root: string;
beforeEach(async () => {
  root = await mkdtemp(join(tmpdir(), "sm-publish-"));
});
afterEach(async () => {
  await rm(root, { recursive: true, force: true });
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A directory entry that is valid when `ok` holds "ok"; `content` goes into `data`. */
function dirEntry(target: string, content: string, extra: Partial<PublishRequest<string>> = {}) {
  const counts = { writes: 0, waits: 0 };
  const req: PublishRequest<string> = {
    target,
    kind: "dir",
    what: `test entry ${target}`,
    check: async () => {
      const ok = await readFile(join(target, "ok"), "utf8").catch(() => undefined);
      return ok === "ok" ? readFile(join(target, "data"), "utf8") : undefined;
    },
    write: async (tmp) => {
      counts.writes++;
      expect(await readdir(tmp)).toEqual([]); // an existing, empty directory
      await writeFile(join(tmp, "data"), content);
      await sleep(100); // long enough for concurrent publishers to queue on the lock
      await writeFile(join(tmp, "ok"), "ok");
      return content;
    },
    onWait: () => void counts.waits++,
    ...extra,
  };
  return { req, counts };
}

/** Holds the entry's lock as another writer would, until the returned release is called. */
async function holdLock(target: string, lockPath = `${target}.lock`) {
  const lock = await acquireLock(lockPath, { what: `test holder of ${target}` });
  return () => lock.release();
}

describe("publish", () => {
  it("writes a directory entry once; later calls return it without writing", async () => {
    const target = join(root, "entries", "e1");
    const { req, counts } = dirEntry(target, "v1");
    await expect(publish(req)).resolves.toEqual({ value: "v1", created: true });
    await expect(publish(req)).resolves.toEqual({ value: "v1", created: false });
    expect(counts.writes).toBe(1);
    expect((await readdir(join(root, "entries"))).sort()).toEqual(["e1"]); // no temp, no lock
  });

  it("returns a valid entry without taking the lock", async () => {
    const target = join(root, "e");
    const { req } = dirEntry(target, "v1");
    await publish(req);
    const release = await holdLock(target);
    try {
      await expect(publish({ ...req, lockTimeoutMs: 50 })).resolves.toEqual({ value: "v1", created: false });
    } finally {
      await release();
    }
  });

  it("writes a file entry, fsynced by publish or by the writer", async () => {
    const target = join(root, "refs", "r.json");
    const file = (synced: boolean, text: string): PublishRequest<string> => ({
      target,
      kind: "file",
      what: "ref r",
      synced,
      check: async () => undefined, // always replaced, like a ref
      write: async (tmp) => {
        expect(existsSync(tmp)).toBe(false); // a path to create
        await writeFile(tmp, text);
        return text;
      },
    });
    await expect(publish(file(false, "one"))).resolves.toEqual({ value: "one", created: true });
    await expect(publish(file(true, "two"))).resolves.toEqual({ value: "two", created: true });
    expect(await readFile(target, "utf8")).toBe("two");
    expect(await readdir(join(root, "refs"))).toEqual(["r.json"]);
  });

  it("lets concurrent publishers of one target write once", async () => {
    const target = join(root, "e");
    const writers = [1, 2, 3].map(() => dirEntry(target, "v1"));
    const results = await Promise.all(writers.map((w) => publish(w.req)));
    expect(results.filter((r) => r.created)).toHaveLength(1);
    expect(results.map((r) => r.value)).toEqual(["v1", "v1", "v1"]);
    expect(writers.reduce((n, w) => n + w.counts.writes, 0)).toBe(1);
    expect(writers.reduce((n, w) => n + w.counts.waits, 0)).toBe(2); // the two that queued
    expect(await readdir(root)).toEqual(["e"]);
  });

  it("leaves no temp, no target and no lock when the writer throws", async () => {
    const target = join(root, "e");
    const { req } = dirEntry(target, "v1", {
      write: async (tmp) => {
        await writeFile(join(tmp, "data"), "partial");
        throw new Error("writer failed");
      },
    });
    await expect(publish(req)).rejects.toThrow("writer failed");
    expect(await readdir(root)).toEqual([]);
    const file = { ...req, kind: "file" as const, target: join(root, "f") };
    await expect(publish({ ...file, write: async (tmp) => (await writeFile(tmp, "partial"), Promise.reject(new Error("file writer failed"))) })).rejects.toThrow("file writer failed");
    expect(await readdir(root)).toEqual([]);
  });

  it("takes over a crashed writer's stale lock and removes its temps, and only this entry's", async () => {
    const target = join(root, "e");
    // What a writer of an earlier version killed mid-write leaves: its temp and its lock
    // directory, no longer refreshed.
    await mkdir(join(root, "e.tmp-deadbeef"));
    await writeFile(join(root, "e.tmp-deadbeef", "data"), "half");
    await writeFile(join(root, "e.tmp-0123456789ab"), "half a file");
    await mkdir(join(root, "e.lock"));
    const old = new Date(Date.now() - 60_000);
    await utimes(join(root, "e.lock"), old, old);
    // A temp of another entry ("e.tmp-b") whose name starts like ours, and unrelated files.
    await mkdir(join(root, "e.tmp-b.tmp-0123"));
    await writeFile(join(root, "e.tmp-notes"), "not hex");

    const { req, counts } = dirEntry(target, "v1");
    const t0 = performance.now();
    await expect(publish(req)).resolves.toEqual({ value: "v1", created: true });
    expect(performance.now() - t0).toBeLessThan(5_000); // no waiting for the dead writer
    expect(counts.waits).toBe(0);
    expect((await readdir(root)).sort()).toEqual(["e", "e.tmp-b.tmp-0123", "e.tmp-notes"]);
  });

  it("removes crashed writers' temps from a given temp dir with a given prefix", async () => {
    const target = join(root, "blobs", "abc");
    const tmpDir = join(root, "tmp");
    await mkdir(tmpDir);
    await writeFile(join(tmpDir, "abc-0011223344ff"), "half");
    await writeFile(join(tmpDir, "abd-0011223344ff"), "another blob's");
    let tmpSeen = "";
    const r = await publish({
      target,
      kind: "file",
      what: "blob abc",
      tmpDir,
      tmpPrefix: "abc-",
      lockPath: join(root, "locks", "abc.lock"),
      check: async () => (existsSync(target) ? "abc" : undefined),
      write: async (tmp) => {
        tmpSeen = tmp;
        await writeFile(tmp, "blob");
        return "abc";
      },
    });
    expect(r).toEqual({ value: "abc", created: true });
    expect(tmpSeen).toMatch(new RegExp(`^${tmpDir}/abc-[0-9a-f]{12}$`));
    expect(await readdir(tmpDir)).toEqual(["abd-0011223344ff"]);
    expect(await readdir(join(root, "locks"))).toEqual([]);
    expect(await readFile(target, "utf8")).toBe("blob");
  });

  it("replaces a damaged target", async () => {
    const target = join(root, "e");
    await mkdir(join(target, "sub"), { recursive: true });
    await writeFile(join(target, "data"), "old");
    await writeFile(join(target, "sub", "junk"), "junk"); // no "ok": damaged
    const { req } = dirEntry(target, "v2");
    await expect(publish(req)).resolves.toEqual({ value: "v2", created: true });
    expect((await readdir(target)).sort()).toEqual(["data", "ok"]);
    expect(await readdir(root)).toEqual(["e"]);

    // A file entry: a damaged file, and a directory where the file should be.
    const file = join(root, "f");
    const fileReq = (text: string): PublishRequest<string> => ({
      target: file,
      kind: "file",
      what: "file f",
      check: async () => ((await readFile(file, "utf8").catch(() => "")).startsWith("valid") ? "old" : undefined),
      write: async (tmp) => (await writeFile(tmp, text), text),
    });
    await writeFile(file, "garbage");
    await expect(publish(fileReq("valid 1"))).resolves.toEqual({ value: "valid 1", created: true });
    await rm(file);
    await mkdir(join(file, "x"), { recursive: true });
    await expect(publish(fileReq("valid 2"))).resolves.toEqual({ value: "valid 2", created: true });
    expect(await readFile(file, "utf8")).toBe("valid 2");
    expect((await readdir(root)).sort()).toEqual(["e", "f"]);
  });

  it("fails with STORE_LOCK_TIMEOUT when the lock is not obtained in time", async () => {
    const target = join(root, "e");
    const release = await holdLock(target);
    try {
      const { req, counts } = dirEntry(target, "v1", { what: "snapshot img-abc", lockTimeoutMs: 300 });
      const t0 = performance.now();
      const err = (await publish(req).catch((e: unknown) => e)) as StoreError;
      const ms = performance.now() - t0;
      expect(err).toBeInstanceOf(StoreError);
      expect(err).toMatchObject({ name: "StoreError", code: "STORE_LOCK_TIMEOUT" });
      expect(err.message).toContain("snapshot img-abc");
      expect(err.message).toContain(`${target}.lock`);
      expect(err.message).toContain(`held by pid ${process.pid} since `);
      expect(err.hint).toBe(`if no other supermachine process is running, remove ${target}.lock`);
      expect(ms).toBeGreaterThanOrEqual(290);
      expect(ms).toBeLessThan(2_000);
      expect(counts).toEqual({ writes: 0, waits: 1 });
    } finally {
      await release();
    }
    expect(await readdir(root)).toEqual([]);
  });

  it("rejects with the signal's reason when aborted while waiting for the lock", async () => {
    const target = join(root, "e");
    const release = await holdLock(target);
    try {
      const { req, counts } = dirEntry(target, "v1");
      const ac = new AbortController();
      const reason = new Error("caller gave up");
      setTimeout(() => ac.abort(reason), 150);
      const t0 = performance.now();
      await expect(publish({ ...req, signal: ac.signal })).rejects.toBe(reason);
      expect(performance.now() - t0).toBeLessThan(1_000);
      expect(counts).toEqual({ writes: 0, waits: 1 });
      await expect(publish({ ...req, signal: AbortSignal.abort(reason) })).rejects.toBe(reason);
    } finally {
      await release();
    }
    expect(await readdir(root)).toEqual([]);
  });
});
