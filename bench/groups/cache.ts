/** Benchmark group `cache`: the snapshot cache: a directory and a registry on loopback. */
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { buildImageGraph } from "../../src/graph/graph.js";
import { buildGraph } from "../../src/project/build.js";
import { importSnapshots } from "../../src/project/cache.js";
import { exportSnapshots } from "../../src/transfer/index.js";
import { generateSigningKey, readSigningKey } from "../../src/transfer/sign.js";

/** Signed exports, imports trusting that key: what a CI cache does. */
const signingKey = readSigningKey(generateSigningKey().privatePem, "the bench's signing key");
const signed = { signingKey };
const trust = [signingKey.publicKey];
import { registryConfig, waitForHttp } from "../util.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const cacheGroup: BenchGroup = {
  name: "cache",
  metrics: ["cache_export_ms", "cache_import_ms", "cache_push_ms", "cache_pull_ms", "parent_push_bytes", "child_push_bytes", "unchanged_push_chunks"],
  run: (ctx) => cacheBenchmarks(ctx),
};

/**
 * Snapshot transfer (src/transfer): one busybox snapshot exported to and imported from a
 * directory and a registry on loopback (each import into an empty home, root filesystem
 * included), and what a child whose warmup writes one small file adds to a registry that has
 * its parent, beside what the parent took; then a push of both again, which moves no chunk.
 */
async function cacheBenchmarks(ctx: BenchContext): Promise<void> {
  const { quick, record, recordValue, progress } = ctx;
  const work = mkdtempSync(join(tmpdir(), "sm-bench-cache-"));
  const { writeRegistryConfig, freePort } = await registryConfig();
  const port = await freePort();
  const regDir = join(work, "registry");
  // stdio ignored: nothing here reads the registry's request log, which would otherwise fill its pipe.
  const registry = spawn("docker-registry", ["serve", writeRegistryConfig({ dir: regDir, port })], { stdio: "ignore" });
  const saved = process.env.SUPERMACHINE_HOME;
  const inHome = async <T>(home: string, fn: () => Promise<T>): Promise<T> => {
    process.env.SUPERMACHINE_HOME = home;
    try {
      return await fn();
    } finally {
      if (saved === undefined) delete process.env.SUPERMACHINE_HOME;
      else process.env.SUPERMACHINE_HOME = saved;
    }
  };
  try {
    await waitForHttp(`http://127.0.0.1:${port}/v2/`);
    const graph = buildImageGraph([
      { name: "base", module: null, from: null, definition: { ref: "builtin:busybox" } },
      { name: "child", module: null, from: "base", definition: { warmupTag: "bench-cache", warmup: async (w) => void (await w.exec({ argv: ["sh", "-c", "echo child > /tmp/child"] })) } },
    ]);
    progress("baking a busybox snapshot and a child of it ...");
    const nodes = await buildGraph(graph, { snapshotsDir: join(work, "snapshots"), handoff: false });
    const base = nodes.get("base")!.snapshot;
    const child = nodes.get("child")!.snapshot;
    if (!base || !child) throw nodes.get("child")!.error ?? nodes.get("base")!.error ?? new Error("bake failed");
    const n = quick ? 3 : 10;
    const timed = async (name: string, count: number, fn: (i: number) => Promise<void>) => {
      const samples: number[] = [];
      for (let i = 0; i < count; i++) {
        const t0 = performance.now();
        await fn(i);
        samples.push(performance.now() - t0);
      }
      record(name, samples);
    };
    const dirs = (i: number) => join(work, `dir-${i}`);
    await timed("cache_export_ms", n, async (i) => void (await exportSnapshots(dirs(i), [base], signed)));
    await timed("cache_import_ms", n, (i) => inHome(join(work, `home-dir-${i}`), async () => {
      const r = await importSnapshots(dirs(i), [base.meta.hash], { snapshotsDir: join(work, `home-dir-${i}`, "snapshots"), trust });
      if (r.snapshots[0]?.status !== "imported") throw new Error(`import: ${r.snapshots[0]?.status}`);
    }));
    const repo = (i: number) => `127.0.0.1:${port}/bench/cache-${i}`;
    const m = quick ? 2 : 5;
    await timed("cache_push_ms", m, async (i) => void (await exportSnapshots(repo(i), [base], signed)));
    await timed("cache_pull_ms", m, (i) => inHome(join(work, `home-reg-${i}`), async () => {
      const r = await importSnapshots(repo(i), [base.meta.hash], { trust });
      if (r.snapshots[0]?.status !== "imported") throw new Error(`pull: ${r.snapshots[0]?.status}`);
    }));
    const layered = `127.0.0.1:${port}/bench/layered`;
    const parent = await exportSnapshots(layered, [base], signed);
    const kid = await exportSnapshots(layered, [child], signed);
    recordValue("parent_push_bytes", parent.bytesMoved, 1, "bytes");
    recordValue("child_push_bytes", kid.bytesMoved, 1, "bytes");
    progress(`child_push_bytes / parent_push_bytes: ${((kid.bytesMoved / parent.bytesMoved) * 100).toFixed(1)}% (${kid.chunksMoved} of ${kid.snapshots[0]!.chunks} chunks)`);
    const again = await exportSnapshots(layered, [base, child], signed);
    recordValue("unchanged_push_chunks", again.chunksMoved, 2, "chunks");
  } finally {
    registry.kill("SIGKILL");
    rmSync(work, { recursive: true, force: true });
  }
}
