// End to end: images pulled from a real registry on loopback (Debian's docker-registry) and
// imported from a docker archive, booted as microVMs. Pull policies, local image management.
import { spawn } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Image } from "../../src/index.js";
import type { BuildProgress } from "../../src/schema/image.js";
import { startProxy, startRegistry, type Registry } from "../helpers/registry.js";
import { cli as runCli } from "../helpers/run.js";

interface Fx {
  python: { layout: string; tag: string };
  busyboxArchive: { file: string; repoTag: string };
}

const root = join(import.meta.dirname, "..", "..");
const savedHome = process.env.SUPERMACHINE_HOME;
let home: string;
let reg: Registry;
let fx: Fx;
let pythonRef: string;

beforeAll(async () => {
  // @ts-ignore -- plain JavaScript module
  const { ensureFixtures } = (await import("../fixtures/build-fixtures.mjs")) as {
    ensureFixtures(o: { only: string[] }): Promise<Fx>;
  };
  fx = await ensureFixtures({ only: ["python", "busyboxArchive"] });
  reg = await startRegistry("plain");
  await reg.push(fx.python.layout, fx.python.tag, "library/python", "3-bookworm");
  pythonRef = `${reg.host}/library/python:3-bookworm`;
  // A private image store for this file: pulls start cold.
  home = mkdtempSync(join(tmpdir(), "sm-e2e-home-"));
  process.env.SUPERMACHINE_HOME = home;
}, 900_000);

afterAll(async () => {
  await reg?.stop();
  if (savedHome === undefined) delete process.env.SUPERMACHINE_HOME;
  else process.env.SUPERMACHINE_HOME = savedHome;
  if (home) rmSync(home, { recursive: true, force: true });
});

const cli = (...args: string[]) => runCli(args, { env: { ...process.env, SUPERMACHINE_HOME: home } });

describe("a Python image from a registry", () => {
  it("is refused with pullPolicy never before it was pulled", async () => {
    await expect(Image.build({ ref: pythonRef, pullPolicy: "never" })).rejects.toMatchObject({
      code: "IMAGE_NOT_PRESENT",
      message: expect.stringContaining(pythonRef),
    });
  });

  it("pulls, boots and runs python3", async () => {
    const events: BuildProgress[] = [];
    const image = await Image.build({ ref: pythonRef, onProgress: (p) => events.push(p) });
    expect(image.digest).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(events.some((e) => e.phase === "pull" && e.event.type === "layer" && e.event.bytes > 0)).toBe(true);
    const pool = await image.pool({ min: 1, max: 1 });
    try {
      const vm = await pool.acquire();
      const r = await vm.exec({ argv: ["python3", "-c", "print(6*7)"], timeoutMs: 30_000 });
      expect(r.stderr.toString()).toBe("");
      expect(r.stdout.toString()).toBe("42\n");
      expect(r.exitCode).toBe(0);
    } finally {
      await pool.shutdown();
    }
  });

  it("runs the seed's Pattern 1: candidates through a pool of 8, each in a clean VM", async () => {
    const image = await Image.build({ ref: pythonRef, memoryMib: 256 });
    const pool = await image.pool({ min: 0, max: 8, restoreOnRelease: true });
    async function runCandidate(source: string): Promise<{ ok: boolean; stdout: string }> {
      const vm = await pool.acquire();
      try {
        const out = await vm.exec({
          argv: ["python3", "/tmp/code.py"],
          stageFiles: { "/tmp/code.py": Buffer.from(source) },
          timeoutMs: 60_000,
        });
        return { ok: out.exitCode === 0, stdout: out.stdout.toString() };
      } finally {
        await vm.release();
      }
    }
    // Each candidate reports whether an earlier one left its marker behind, then leaves one.
    const candidates = Array.from(
      { length: 12 },
      (_, i) => `import os\nprint(${i}, os.path.exists("/tmp/dirty"))\nopen("/tmp/dirty", "w").write("x")\n`,
    );
    try {
      const results = await Promise.all(candidates.map(runCandidate));
      expect(results).toEqual(candidates.map((_, i) => ({ ok: true, stdout: `${i} False\n` })));
      expect(pool.stats().alive).toBeLessThanOrEqual(8);
    } finally {
      await pool.shutdown();
    }
  });

  it("is downloaded once when two processes pull it at the same time", async () => {
    // A proxy in front of the registry counts blob downloads; each pull gets a slow start so
    // that the two really overlap.
    const proxy = await startProxy(reg.host, () => ({ delay: 50 }));
    const sharedHome = mkdtempSync(join(tmpdir(), "sm-e2e-shared-"));
    try {
      const ref = `${proxy.host}/library/python:3-bookworm`;
      const run = () =>
        new Promise<{ code: number | null; out: string }>((resolve) => {
          const child = spawn(process.execPath, [join(root, "dist/src/cli/main.js"), "pull", "--json", ref], {
            env: { ...process.env, SUPERMACHINE_HOME: sharedHome },
            stdio: ["ignore", "pipe", "ignore"],
          });
          let out = "";
          child.stdout.on("data", (d: Buffer) => (out += d.toString()));
          child.on("exit", (code) => resolve({ code, out }));
        });
      const [a, b] = await Promise.all([run(), run()]);
      expect([a.code, b.code]).toEqual([0, 0]);
      expect(JSON.parse(a.out).digest).toBe(JSON.parse(b.out).digest);
      const blobGets = proxy.seen.filter((r) => r.method === "GET" && r.path.includes("/blobs/sha256:"));
      const perBlob = new Map<string, number>();
      for (const r of blobGets) perBlob.set(r.path, (perBlob.get(r.path) ?? 0) + 1);
      expect(perBlob.size).toBeGreaterThanOrEqual(2); // config and layer
      expect([...perBlob.values()].every((n) => n === 1)).toBe(true);
      expect(readdirSync(join(sharedHome, "store", "tmp"))).toEqual([]);
    } finally {
      await proxy.close();
      rmSync(sharedHome, { recursive: true, force: true });
    }
  });

  it("serves pullPolicy missing from disk, and always asks the registry", async () => {
    const first = await Image.build({ ref: pythonRef });
    await reg.stop();
    const offline = await Image.build({ ref: pythonRef, pullPolicy: "missing" });
    expect(offline.digest).toBe(first.digest);
    const never = await Image.build({ ref: pythonRef, pullPolicy: "never" });
    expect(never.digest).toBe(first.digest);
    await expect(Image.build({ ref: pythonRef, pullPolicy: "always" })).rejects.toMatchObject({
      code: "REGISTRY_UNREACHABLE",
      message: expect.stringContaining(`registry unreachable: ${reg.host}`),
    });
  });

  it("lists and removes local images from the CLI", async () => {
    const list = await cli("images", "--json");
    expect(list.status).toBe(0);
    const images = JSON.parse(list.stdout) as { ref: string; blobBytes: number; rootfsBytes: number }[];
    const py = images.find((i) => i.ref === `${reg.host}/library/python:3-bookworm`);
    expect(py).toBeDefined();
    expect(py!.blobBytes).toBeGreaterThan(1_000_000);
    expect(py!.rootfsBytes).toBeGreaterThan(1_000_000);
    const rmi = await cli("rmi", "--json", pythonRef);
    expect(rmi.status).toBe(0);
    expect(JSON.parse(rmi.stdout)).toMatchObject({ removed: [`${reg.host}/library/python:3-bookworm`], imagesRemoved: 1 });
    expect(JSON.parse(rmi.stdout).blobsRemoved).toBeGreaterThanOrEqual(3);
    expect(JSON.parse((await cli("images", "--json")).stdout)).toEqual([]);
    expect((await cli("rmi", pythonRef)).status).toBe(1);
  });
});

describe("a docker archive", () => {
  it("is imported into the store and boots", async () => {
    const image = await Image.build({ ref: `docker-archive:${fx.busyboxArchive.file}:busybox:latest` });
    const pool = await image.pool({ min: 1, max: 1 });
    try {
      const vm = await pool.acquire();
      expect((await vm.exec({ argv: ["echo", "from an archive"] })).stdout.toString()).toBe("from an archive\n");
    } finally {
      await pool.shutdown();
    }
    // The second build is a cache hit on the imported manifest.
    expect((await Image.build({ ref: `docker-archive:${fx.busyboxArchive.file}:busybox:latest` })).digest).toBe(image.digest);
  });
});
