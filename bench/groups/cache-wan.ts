/**
 * Benchmark group `cache_wan`: the snapshot cache across a 20 ms round trip (a latency proxy,
 * 10 ms each way, in front of a local distribution registry), beside skopeo moving one blob of
 * the same bytes through the same proxy in the same run.
 */
import { execFile, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { buildImageGraph } from "../../src/graph/graph.js";
import { buildGraph } from "../../src/project/build.js";
import { importSnapshots } from "../../src/project/cache.js";
import type { LoadedSnapshot } from "../../src/store/snapshots.js";
import { exportSnapshots } from "../../src/transfer/index.js";
import { generateSigningKey, readSigningKey } from "../../src/transfer/sign.js";
import { digestOf } from "../../src/transfer/format.js";
import type { BenchContext, BenchGroup } from "../harness.js";
import { fixtures, registryConfig, waitForHttp } from "../util.js";
import { startWanProxyProcess } from "../wan-proxy-process.js";

const execFileP = promisify(execFile);
const DELAY_MS = 10;

export const cacheWanGroup: BenchGroup = {
  name: "cache_wan",
  metrics: [
    "cache_push_wan_ms",
    "skopeo_push_wan_ms",
    "cache_pull_wan_ms",
    "skopeo_pull_wan_ms",
    "child_push_wan_ms",
    "cache_push_requests",
    "python_push_wan_ms",
    "python_skopeo_push_wan_ms",
    "python_pull_wan_ms",
    "python_skopeo_pull_wan_ms",
    "python_manifest_bytes",
  ],
  run: (ctx) => wanBenchmarks(ctx),
};

const signingKey = readSigningKey(generateSigningKey().privatePem, "the bench's signing key");

/** An OCI layout holding one image whose one layer is `bytes` random bytes: what skopeo moves as the peer. */
function blobLayout(dir: string, bytes: number): string {
  const blobs = join(dir, "blobs", "sha256");
  mkdirSync(blobs, { recursive: true });
  const put = (b: Buffer) => {
    const d = digestOf(b);
    writeFileSync(join(blobs, d.slice(7)), b);
    return { digest: d, size: b.length };
  };
  const layer = put(randomBytes(bytes));
  const config = put(Buffer.from(JSON.stringify({ architecture: "amd64", os: "linux", rootfs: { type: "layers", diff_ids: [layer.digest] } })));
  const manifest = put(Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json", config: { mediaType: "application/vnd.oci.image.config.v1+json", ...config }, layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar", ...layer }] })));
  writeFileSync(join(dir, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  writeFileSync(join(dir, "index.json"), JSON.stringify({ schemaVersion: 2, manifests: [{ mediaType: "application/vnd.oci.image.manifest.v1+json", ...manifest, annotations: { "org.opencontainers.image.ref.name": "blob" } }] }));
  return `oci:${dir}:blob`;
}

async function wanBenchmarks(ctx: BenchContext): Promise<void> {
  const { quick, record, recordValue, progress } = ctx;
  const work = mkdtempSync(join(tmpdir(), "sm-bench-wan-"));
  const { writeRegistryConfig, freePort } = await registryConfig();
  const port = await freePort();
  const registry = spawn("docker-registry", ["serve", writeRegistryConfig({ dir: join(work, "registry"), port })], { stdio: "ignore" });
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
  // In a process of its own: its relaying must not take CPU from the transfer it measures.
  const proxy = await startWanProxyProcess(`127.0.0.1:${port}`, DELAY_MS);
  try {
    await waitForHttp(`http://127.0.0.1:${port}/v2/`);
    const fx = await (await fixtures()).ensureFixtures({ only: ["python"], log: progress });
    progress("baking busybox, a child of it, and a 512 MiB python snapshot ...");
    const graph = buildImageGraph([
      { name: "base", module: null, from: null, definition: { ref: "builtin:busybox", warmupTag: "bench-wan", warmup: async (w) => void (await w.exec({ argv: ["sh", "-c", "head -c 3000000 /dev/urandom > /tmp/warm"] })) } },
      { name: "child", module: null, from: "base", definition: { warmupTag: "bench-wan-child", warmup: async (w) => void (await w.exec({ argv: ["sh", "-c", "echo child > /tmp/child"] })) } },
      { name: "py", module: null, from: null, definition: { ref: fx.python.ref, memoryMib: 512, warmupTag: "bench-wan-py", warmup: async (w) => void (await w.exec({ argv: ["python3", "-c", "import json, ssl, sqlite3, decimal; print('ok')"] })) } },
    ]);
    const nodes = await buildGraph(graph, { snapshotsDir: join(work, "snapshots"), handoff: false });
    for (const n of nodes.values()) if (!n.snapshot) throw n.error ?? new Error(`${n.name} was not baked`);
    const snap = (n: string) => nodes.get(n)!.snapshot as LoadedSnapshot;
    const n = quick ? 1 : 3;
    const via = (repo: string) => `${proxy.host}/${repo}`;

    const pair = async (prefix: string, parent: LoadedSnapshot, child: LoadedSnapshot | undefined) => {
      const push: number[] = [];
      const pull: number[] = [];
      const skPush: number[] = [];
      const skPull: number[] = [];
      const kidMs: number[] = [];
      let requests = 0;
      let bytes = 0;
      for (let i = 0; i < n; i++) {
        const repo = via(`bench/${prefix}-${i}`);
        let t = performance.now();
        const r = await exportSnapshots(repo, [parent], { signingKey });
        push.push(performance.now() - t);
        bytes = r.bytesMoved;
        if (child) {
          t = performance.now();
          const k = await exportSnapshots(repo, [child], { signingKey });
          kidMs.push(performance.now() - t);
          requests = k.requests ?? NaN;
        }
        t = performance.now();
        const home = join(work, `home-${prefix}-${i}`);
        const p = await inHome(home, () => importSnapshots(repo, [parent.meta.hash], { trust: [signingKey.publicKey] }));
        pull.push(performance.now() - t);
        if (p.snapshots[0]?.status !== "imported") throw new Error(`pull of ${prefix}: ${p.snapshots[0]?.status}`);
        rmSync(home, { recursive: true, force: true });
        // The peer: one blob of the same bytes, through the same proxy.
        const layout = blobLayout(join(work, `skopeo-${prefix}-${i}`), bytes);
        t = performance.now();
        await execFileP("skopeo", ["copy", "--quiet", "--dest-tls-verify=false", layout, `docker://${via(`bench/skopeo-${prefix}-${i}`)}:blob`]);
        skPush.push(performance.now() - t);
        t = performance.now();
        await execFileP("skopeo", ["copy", "--quiet", "--src-tls-verify=false", `docker://${via(`bench/skopeo-${prefix}-${i}`)}:blob`, `oci:${join(work, `skopeo-pull-${prefix}-${i}`)}:blob`]);
        skPull.push(performance.now() - t);
      }
      return { push, pull, skPush, skPull, kidMs, requests, bytes };
    };

    progress("busybox parent and child through the proxy ...");
    const bb = await pair("busybox", snap("base"), snap("child"));
    record("cache_push_wan_ms", bb.push);
    record("skopeo_push_wan_ms", bb.skPush);
    record("cache_pull_wan_ms", bb.pull);
    record("skopeo_pull_wan_ms", bb.skPull);
    record("child_push_wan_ms", bb.kidMs);
    recordValue("cache_push_requests", bb.requests, 1, "requests");
    const med = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]!;
    progress(`busybox: push ${Math.round(med(bb.push))} ms vs skopeo ${Math.round(med(bb.skPush))} ms (${(med(bb.push) / med(bb.skPush)).toFixed(2)}x); pull ${Math.round(med(bb.pull))} vs ${Math.round(med(bb.skPull))} ms; child ${Math.round(med(bb.kidMs))} ms (${(med(bb.kidMs) / med(bb.push)).toFixed(2)}x of the parent) in ${bb.requests} requests; ${bb.bytes} bytes`);

    progress("python (512 MiB guest) through the proxy ...");
    const py = await pair("python", snap("py"), undefined);
    record("python_push_wan_ms", py.push);
    record("python_skopeo_push_wan_ms", py.skPush);
    record("python_pull_wan_ms", py.pull);
    record("python_skopeo_pull_wan_ms", py.skPull);
    const dirCache = join(work, "py-dir");
    await exportSnapshots(dirCache, [snap("py")], { signingKey });
    const index = JSON.parse(readFileSync(join(dirCache, "index.json"), "utf8")) as { manifests: { size: number }[] };
    recordValue("python_manifest_bytes", index.manifests[0]!.size, 1, "bytes");
    progress(`python: push ${Math.round(med(py.push))} ms vs skopeo ${Math.round(med(py.skPush))} ms (${(med(py.push) / med(py.skPush)).toFixed(2)}x); pull ${Math.round(med(py.pull))} vs ${Math.round(med(py.skPull))} ms; ${py.bytes} bytes; manifest ${index.manifests[0]!.size} bytes`);
  } finally {
    await proxy.close();
    registry.kill("SIGKILL");
    rmSync(work, { recursive: true, force: true });
  }
}
