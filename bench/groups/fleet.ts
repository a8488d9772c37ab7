/**
 * Benchmark group `fleet`: what a front costs, and what a node that lacks a snapshot pays.
 * A busybox project is baked once and pushed to a registry on loopback (Debian's
 * docker-registry); nodes are `supermachine serve --lazy --frozen --cache-from` processes, each
 * with an empty home of its own (as a new host's), and the front runs in this process.
 * - `node_create_ms`: a create (native API) sent straight to a node whose pool is open and warm.
 * - `front_create_ms`, in the same run, interleaved with it: the same create through the front.
 *   Their ratio is the front's overhead (one more hop, placement).
 * - `cold_node_first_create_ms`: the first create on a new node whose home holds nothing: it
 *   imports the snapshot (root filesystem included) from the registry, opens the pool, restores.
 * - `fleet_cache_pull_ms`, its peer: the import alone of that snapshot from the same registry
 *   into an empty home.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { homePaths } from "../../src/paths.js";
import { packageRoot } from "../../src/engine/artifacts.js";
import { importSnapshots } from "../../src/project/cache.js";
import { KeyStore } from "../../src/server/keys.js";
import { startFront } from "../../src/server/front/index.js";
import type { NodeReport } from "../../src/server/node.js";
import { registryConfig, waitForHttp } from "../util.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const fleetGroup: BenchGroup = {
  name: "fleet",
  metrics: ["node_create_ms", "front_create_ms", "cold_node_first_create_ms", "fleet_cache_pull_ms"],
  run: (ctx) => fleetBenchmarks(ctx),
};

const CONFIG = `import { defineConfig, defineImage } from "supermachine/config";
export default defineConfig({
  images: { box: defineImage({ ref: "builtin:busybox" }) },
  pools: { base: { image: "box", min: 2, max: 8 } },
  cache: { trust: "unsigned" },
});
`;

const CLI = () => join(packageRoot(), "dist", "src", "cli", "main.js");

interface NodeProc {
  url: string;
  child: ChildProcess;
  exited: Promise<number | null>;
}

/** A node process on an empty home of its own; resolves once it is ready. */
function startNode(project: string, home: string, args: string[]): Promise<NodeProc> {
  cpSync(join(homePaths().home, "builtin", "busybox"), join(home, "builtin", "busybox"), { recursive: true });
  const child = spawn(process.execPath, [CLI(), "--json", "serve", "--listen", "127.0.0.1:0", ...args], { cwd: project, env: { ...process.env, SUPERMACHINE_HOME: home }, stdio: ["ignore", "pipe", "pipe"] });
  const exited = new Promise<number | null>((r) => child.once("close", (code) => r(code)));
  let stderr = "";
  child.stderr!.on("data", (c: Buffer) => void (stderr = (stderr + c.toString()).slice(-4000)));
  return new Promise((resolve, reject) => {
    let buf = "";
    let url = "";
    child.stdout!.on("data", (c: Buffer) => {
      buf += c.toString();
      for (let i = buf.indexOf("\n"); i >= 0; i = buf.indexOf("\n")) {
        const msg = JSON.parse(buf.slice(0, i)) as { type: string; url: string };
        buf = buf.slice(i + 1);
        if (msg.url) url = msg.url;
        if (msg.type === "ready") resolve({ url, child, exited });
      }
    });
    void exited.then((code) => reject(new Error(`the node exited (${code}) before it was ready: ${stderr}`)));
  });
}

async function stopNode(n: NodeProc): Promise<void> {
  n.child.kill("SIGTERM");
  const timer = setTimeout(() => n.child.kill("SIGKILL"), 30_000);
  await n.exited;
  clearTimeout(timer);
}

async function fleetBenchmarks(ctx: BenchContext): Promise<void> {
  const { quick, record, progress } = ctx;
  const work = mkdtempSync(join(tmpdir(), "sm-bench-fleet-"));
  const { writeRegistryConfig, freePort } = await registryConfig();
  const port = await freePort();
  const registry = spawn("docker-registry", ["serve", writeRegistryConfig({ dir: join(work, "registry"), port })], { stdio: "ignore" });
  const nodes: NodeProc[] = [];
  let front: Awaited<ReturnType<typeof startFront>> | undefined;
  try {
    await waitForHttp(`http://127.0.0.1:${port}/v2/`);
    const dir = join(work, "project");
    mkdirSync(dir);
    writeFileSync(join(dir, "supermachine.config.ts"), CONFIG);
    const keys = new KeyStore(join(dir, "keys.json"));
    const { key } = await keys.create({ name: "bench" });
    const cache = `127.0.0.1:${port}/bench/fleet`;
    progress("fleet: baking the busybox project and pushing it to the registry");
    const build = spawn(process.execPath, [CLI(), "build", "--cache-to", cache], { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
    let buildErr = "";
    build.stderr!.on("data", (c: Buffer) => void (buildErr += c.toString()));
    const code = await new Promise<number | null>((r) => build.once("close", r));
    if (code !== 0) throw new Error(`supermachine build --cache-to failed: ${buildErr.slice(-2000)}`);

    const nodeArgs = ["--keys", keys.path, "--lazy", "--frozen", "--cache-from", cache];
    const headers = { "x-api-key": key, "content-type": "application/json" };
    const create = async (base: string): Promise<{ ms: number; id: string }> => {
      const t0 = performance.now();
      const res = await fetch(`${base}/v1/sandboxes`, { method: "POST", headers, body: JSON.stringify({ pool: "base" }) });
      const ms = performance.now() - t0;
      if (res.status !== 201) throw new Error(`create through ${base}: ${res.status} ${await res.text()}`);
      return { ms, id: ((await res.json()) as { id: string }).id };
    };
    const kill = async (base: string, id: string) => {
      const res = await fetch(`${base}/v1/sandboxes/${id}`, { method: "DELETE", headers: { "x-api-key": key } });
      if (res.status !== 204) throw new Error(`kill ${id}: ${res.status}`);
    };

    progress("fleet: a node, and a front over it");
    const node = await startNode(dir, join(work, "home-warm"), nodeArgs);
    nodes.push(node);
    front = await startFront({ nodes: new URL(node.url).host, listen: "127.0.0.1:0", logLevel: "silent", pollMs: 500 });
    // Opens the pool (the import) and warms both paths.
    for (const base of [node.url, front.url, node.url, front.url]) {
      const c = await create(base);
      await kill(base, c.id);
    }
    const n = quick ? 8 : 40;
    const direct: number[] = [];
    const through: number[] = [];
    for (let i = 0; i < n; i++) {
      // Interleaved, so that both see the same machine; each create's VM goes back before the next.
      for (const [base, out] of [[node.url, direct], [front.url, through]] as const) {
        const c = await create(base);
        out.push(c.ms);
        await kill(base, c.id);
        // The pool refills its idle VM in the background: wait for it, so every create is warm.
        await waitWarm(node.url);
      }
    }
    record("node_create_ms", direct);
    record("front_create_ms", through);
    const report = (await (await fetch(`${node.url}/v1/node`)).json()) as NodeReport;
    const snapshotKey = report.pools.find((p) => p.name === "base")?.key;
    if (!snapshotKey) throw new Error("the node reports no key for pool base");
    await front.close();
    front = undefined;
    await stopNode(node);
    nodes.length = 0;

    const m = quick ? 1 : 3;
    const cold: number[] = [];
    for (let i = 0; i < m; i++) {
      progress(`fleet: a new node with an empty home (${i + 1}/${m})`);
      const fresh = await startNode(dir, join(work, `home-cold-${i}`), nodeArgs);
      nodes.push(fresh);
      const c = await create(fresh.url);
      cold.push(c.ms);
      await kill(fresh.url, c.id);
      await stopNode(fresh);
      nodes.length = 0;
    }
    record("cold_node_first_create_ms", cold);

    const pulls: number[] = [];
    const saved = process.env.SUPERMACHINE_HOME;
    for (let i = 0; i < m; i++) {
      const home = join(work, `home-pull-${i}`);
      process.env.SUPERMACHINE_HOME = home;
      try {
        const t0 = performance.now();
        const r = await importSnapshots(cache, [snapshotKey], { trust: "unsigned" });
        pulls.push(performance.now() - t0);
        if (r.snapshots[0]?.status !== "imported") throw new Error(`pull: ${r.snapshots[0]?.status}`);
      } finally {
        if (saved === undefined) delete process.env.SUPERMACHINE_HOME;
        else process.env.SUPERMACHINE_HOME = saved;
      }
    }
    record("fleet_cache_pull_ms", pulls);
  } finally {
    await front?.close().catch(() => {});
    for (const n of nodes) await stopNode(n).catch(() => {});
    registry.kill("SIGKILL");
    rmSync(work, { recursive: true, force: true });
  }
}

/** Until the node's pool has its idle VMs back (min 2). */
async function waitWarm(url: string): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    const r = (await (await fetch(`${url}/v1/node`)).json()) as NodeReport;
    if ((r.pools.find((p) => p.name === "base")?.idle ?? 0) >= 2) return;
    await new Promise((res) => setTimeout(res, 20));
  }
  throw new Error("the node's pool did not get its idle VMs back within 30 s");
}
