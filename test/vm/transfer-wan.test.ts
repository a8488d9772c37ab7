// The snapshot cache across a slow link, on real VMs and a real registry: a latency proxy in
// front of a local distribution registry (10 ms each way, a nearby cloud registry) carries a
// parent and its child there and back; a request-counting view of the same proxy shows what a
// child push costs; a push the proxy cuts halfway through a pack resumes within the same call
// and resends only what the registry lacks; a 512 MiB python snapshot exports with a small
// manifest.
import { readFileSync, rmSync, statSync } from "node:fs";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { buildImageGraph } from "../../src/graph/graph.js";
import { homePaths } from "../../src/paths.js";
import { buildGraph } from "../../src/project/build.js";
import { importSnapshots } from "../../src/project/cache.js";
import type { LoadedSnapshot } from "../../src/store/snapshots.js";
import { exportSnapshots } from "../../src/transfer/index.js";
// @ts-expect-error plain JavaScript helpers without types
import { ensureFixtures } from "../fixtures/build-fixtures.mjs";
import { startRegistry, type Registry } from "../helpers/registry.js";
import { entryOf, manifestOf } from "../helpers/transfer-format.js";
import { inHome, signed, trusted } from "../helpers/transfer.js";
import { startWanProxy } from "../helpers/wan-proxy.js";

const work = mkdtempSync(join(tmpdir(), "sm-transfer-wan-"));
let reg: Registry;
let base: LoadedSnapshot;
let child: LoadedSnapshot;
let big: LoadedSnapshot;

beforeAll(async () => {
  reg = await startRegistry("plain");
  const graph = buildImageGraph([
    { name: "base", module: null, from: null, definition: { ref: "builtin:busybox" } },
    { name: "child", module: null, from: "base", definition: { warmupTag: "wan-child", warmup: async (w) => void (await w.exec({ argv: ["sh", "-c", "echo child > /tmp/child"] })) } },
    // 24 MiB of random bytes in guest memory (tmpfs): incompressible, so its packs are full-sized.
    { name: "big", module: null, from: "base", definition: { warmupTag: "wan-big", warmup: async (w) => void (await w.exec({ argv: ["sh", "-c", "head -c 25165824 /dev/urandom > /tmp/big"] })) } },
  ]);
  const nodes = await buildGraph(graph, { snapshotsDir: join(work, "snapshots"), handoff: false });
  for (const n of nodes.values()) if (!n.snapshot) throw n.error ?? new Error(`${n.name} was not baked`);
  base = nodes.get("base")!.snapshot!;
  child = nodes.get("child")!.snapshot!;
  big = nodes.get("big")!.snapshot!;
}, 900_000);

afterAll(async () => {
  await reg?.stop();
  rmSync(work, { recursive: true, force: true });
});

describe("a registry cache across a 20 ms round trip", () => {
  it("pushes a parent and its child, a child in about 10 requests, and pulls both back verified", async () => {
    const proxy = await startWanProxy({ target: reg.host, delayMs: 10 });
    try {
      const repo = `${proxy.host}/wan/pair`;
      const t0 = performance.now();
      const parent = await exportSnapshots(repo, [base], signed);
      const parentMs = performance.now() - t0;
      expect(parent.snapshots[0]!.status).toBe("exported");
      proxy.reset();
      const t1 = performance.now();
      const kid = await exportSnapshots(repo, [child], signed);
      const childMs = performance.now() - t1;
      expect(kid.snapshots[0]!.status).toBe("exported");
      const requests = proxy.stats.requests.map((r) => `${r.method} ${r.path.replace(/[0-9a-f]{64}/g, "…").replace(/uploads\/[^?]+/, "uploads/…")}`);
      process.stderr.write(`child push: ${requests.length} requests, ${Math.round(childMs)} ms (parent ${Math.round(parentMs)} ms); ${requests.join(", ")}\n`);
      expect(requests.length).toBeLessThanOrEqual(10);
      expect(kid.requests).toBe(requests.length);
      expect(kid.bytesMoved).toBeLessThan(parent.bytesMoved * 0.1);

      const home = join(work, "home-pull");
      const pulled = await inHome(home, () => importSnapshots(repo, [child.meta.hash], trusted));
      expect(pulled.snapshots.map((s) => [s.name, s.status])).toEqual([["base", "imported"], ["child", "imported"]]);
      await inHome(home, async () => {
        for (const s of [base, child]) {
          const dir = join(homePaths().snapshots, `${s.meta.sources!.name}-${s.meta.hash.slice(0, 16)}`);
          expect(readFileSync(join(dir, "ram")).equals(readFileSync(s.ram)), s.meta.sources!.name).toBe(true);
          expect(readFileSync(join(dir, "state")).equals(readFileSync(s.state))).toBe(true);
        }
      });
    } finally {
      await proxy.close();
    }
  }, 600_000);

  it("resumes a push the network cut halfway through a pack, sending only what the registry lacks", async () => {
    const proxy = await startWanProxy({ target: reg.host, delayMs: 10, cut: { afterUploadBytes: 14 * 1024 * 1024, beforeBody: true } });
    try {
      const repo = `${proxy.host}/wan/cut`;
      const r = await exportSnapshots(repo, [base, big], signed);
      expect(r.snapshots.map((s) => s.status)).toEqual(["exported", "exported"]);
      // Everything it wrote, once, plus at most one resent piece (8 MiB) and the requests' own bytes.
      const payload = r.bytesMoved;
      process.stderr.write(`cut push: ${proxy.stats.bytesUp} bytes up for ${payload} bytes of blobs; ${proxy.stats.connections} connections\n`);
      expect(proxy.stats.connections).toBeGreaterThan(1); // the cut connection, and at least one after it
      expect(proxy.stats.bytesUp).toBeLessThan(payload + 8 * 1024 * 1024 + 512 * 1024);
      const home = join(work, "home-cut");
      const pulled = await inHome(home, () => importSnapshots(`${reg.host}/wan/cut`, [big.meta.hash], trusted));
      expect(pulled.snapshots.map((s) => s.status)).toEqual(["imported", "imported"]);
      await inHome(home, async () => {
        const dir = join(homePaths().snapshots, `big-${big.meta.hash.slice(0, 16)}`);
        expect(readFileSync(join(dir, "ram")).equals(readFileSync(big.ram))).toBe(true);
      });
    } finally {
      await proxy.close();
    }
  }, 600_000);
});

describe("a large guest", () => {
  it("exports a 512 MiB python snapshot with a manifest under 64 KiB", async () => {
    const fx = (await ensureFixtures({ only: ["python"] })) as { python: { ref: string } };
    const graph = buildImageGraph([{ name: "py", module: null, from: null, definition: { ref: fx.python.ref, memoryMib: 512, warmupTag: "wan-py", warmup: async (w) => void (await w.exec({ argv: ["python3", "-c", "import json, ssl, sqlite3; print('ok')"] })) } }]);
    const nodes = await buildGraph(graph, { snapshotsDir: join(work, "snapshots"), handoff: false });
    const py = nodes.get("py")!.snapshot;
    if (!py) throw nodes.get("py")!.error ?? new Error("py was not baked");
    const cache = join(work, "py-cache");
    const r = await exportSnapshots(cache, [py], signed);
    expect(r.snapshots[0]!.status).toBe("exported");
    const e = entryOf(cache, py.meta.hash);
    const m = manifestOf(cache, py.meta.hash);
    process.stderr.write(`python snapshot: manifest ${e.size} bytes, ${m.layers.length} layers, ${r.bytesMoved} bytes exported (RAM ${statSync(py.ram).size} bytes, root filesystem ${py.meta.image.rootfsSize})\n`);
    expect(e.size).toBeLessThan(64 * 1024);
    expect(m.layers.length).toBeLessThan(100);
  }, 900_000);
});
