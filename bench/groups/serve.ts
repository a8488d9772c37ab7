/**
 * Benchmark group `serve`: time to interactive through `supermachine serve`, with the method of
 * the public cross-provider sandbox benchmark: `create()`, then the first command's output
 * (`python3 -V` on the python fixture), sandbox killed after.
 * - `tti_e2b_ms`: sequentially, through the unchanged `e2b` SDK.
 * - `tti_connect_ms`: the same through the package's remote client (`connect()`: acquire, exec,
 *   release).
 * - `tti_inprocess_ms`, the peer: `acquire()` + `exec()` in process on a pool of the same image.
 * All three run the command line the SDK sends (`bash -l -c "python3 -V"`: a login shell's first
 * start in a fresh VM is most of the time under TCG), so their ratio is the server's and the
 * clients' overhead.
 * - `tti_burst_ms`: 100 (quick: 20) creates at once through the SDK, each one's time from the
 *   burst's start, on a second server whose only pool is kept that warm (so the idle VMs of the
 *   burst pool do not take CPU from the sequential figures).
 * The servers run in this process on loopback, so the figures hold no network.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Image } from "../../src/runtime/image.js";
import { KeyStore } from "../../src/server/keys.js";
import { startServer, type SupermachineServer } from "../../src/server/index.js";
import { connect } from "../../src/remote/index.js";
import { fixtures } from "../util.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const serveGroup: BenchGroup = {
  name: "serve",
  metrics: ["tti_e2b_ms", "tti_connect_ms", "tti_burst_ms", "tti_inprocess_ms"],
  run: (ctx) => serveBenchmarks(ctx),
};

const COMMAND = ["bash", "-l", "-c", "python3 -V"];

function checkVersion(out: string): void {
  if (!/^Python 3\./.test(out)) throw new Error(`python3 -V printed ${JSON.stringify(out)}`);
}

/** A server on a temp project with one pool of the python fixture; `use` gets its URL and a key. */
async function withServer(ref: string, pool: { name: string; min: number; max: number }, use: (url: string, key: string) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "sm-bench-serve-"));
  let server: SupermachineServer | undefined;
  const saved = { url: process.env.E2B_API_URL, sandbox: process.env.E2B_SANDBOX_URL, key: process.env.E2B_API_KEY };
  try {
    writeFileSync(
      join(dir, "supermachine.config.ts"),
      `import { defineConfig, defineImage } from "supermachine/config";
export default defineConfig({
  images: { python: defineImage({ ref: ${JSON.stringify(ref)} }) },
  pools: { ${pool.name}: { image: "python", min: ${pool.min}, max: ${pool.max}, acquireTimeoutMs: 300000 } },
});
`,
    );
    const keys = new KeyStore(join(dir, "keys.json"));
    const { key } = await keys.create({ name: "bench" });
    server = await startServer({ cwd: dir, listen: "127.0.0.1:0", keys: keys.path, logLevel: "silent" });
    await server.ready;
    process.env.E2B_API_URL = server.url;
    process.env.E2B_SANDBOX_URL = server.url;
    process.env.E2B_API_KEY = key;
    await use(server.url, key);
  } finally {
    for (const [name, value] of [["E2B_API_URL", saved.url], ["E2B_SANDBOX_URL", saved.sandbox], ["E2B_API_KEY", saved.key]] as const) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
    await server?.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

async function serveBenchmarks(ctx: BenchContext): Promise<void> {
  const { quick, record, progress } = ctx;
  const fx = await (await fixtures()).ensureFixtures({ only: ["python"], log: progress });
  const n = quick ? 20 : 100;
  const burst = quick ? 20 : 100;
  const { Sandbox } = await import("e2b");

  progress("serve: sequential creates (bakes the python image if needed)");
  await withServer(fx.python.ref, { name: "python", min: 2, max: 4 }, async (url, key) => {
    const viaSdk: number[] = [];
    for (let i = 0; i < n + 3; i++) {
      const t0 = performance.now();
      const sandbox = await Sandbox.create("python");
      const r = await sandbox.commands.run("python3 -V");
      const ms = performance.now() - t0;
      checkVersion(r.stdout);
      await sandbox.kill();
      if (i >= 3) viaSdk.push(ms); // the first ones warm the SDK's connections
    }
    record("tti_e2b_ms", viaSdk);

    const remote = await connect(url, { apiKey: key });
    try {
      const viaConnect: number[] = [];
      for (let i = 0; i < n + 3; i++) {
        const t0 = performance.now();
        const vm = await remote.python!.acquire();
        const r = await vm.exec({ argv: COMMAND });
        const ms = performance.now() - t0;
        checkVersion(r.stdout.toString());
        await vm.release();
        if (i >= 3) viaConnect.push(ms);
      }
      record("tti_connect_ms", viaConnect);
    } finally {
      await remote.close();
    }
  });

  // The peer, with no server running: the same image, in process.
  const image = await Image.build({ ref: fx.python.ref });
  const pool = await image.pool({ min: 2, max: 4 });
  try {
    const local: number[] = [];
    for (let i = 0; i < n + 3; i++) {
      const t0 = performance.now();
      const vm = await pool.acquire();
      const r = await vm.exec({ argv: COMMAND });
      const ms = performance.now() - t0;
      checkVersion(r.stdout.toString());
      await vm.release();
      if (i >= 3) local.push(ms);
    }
    record("tti_inprocess_ms", local);
  } finally {
    await pool.shutdown();
  }

  const BURST_TIMEOUT_MS = 600_000;
  progress(`serve: ${burst} creates at once (the pool first restores ${burst} VMs)`);
  await withServer(fx.python.ref, { name: "burst", min: burst, max: burst }, async (url, key) => {
    // Ready means the pool is serving; its other VMs may still be restoring. Wait until all are idle.
    const until = Date.now() + 600_000;
    for (;;) {
      const { stats } = (await (await fetch(`${url}/v1/pools/burst`, { headers: { "x-api-key": key } })).json()) as { stats: { idle: number } };
      if (stats.idle >= burst) break;
      if (Date.now() > until) throw new Error(`the burst pool has ${stats.idle} of ${burst} VMs idle after 10 minutes`);
      await new Promise((r) => setTimeout(r, 500));
    }
    await new Promise((r) => setTimeout(r, 2_000));
    const t0 = performance.now();
    const results = await Promise.all(
      Array.from({ length: burst }, async () => {
        // 100 first runs of python at once on a small TCG host take about a minute of CPU: the
        // SDK's 60 s defaults would abort the slowest, which measures the defaults, not us.
        const sandbox = await Sandbox.create("burst", { requestTimeoutMs: BURST_TIMEOUT_MS });
        const r = await sandbox.commands.run("python3 -V", { timeoutMs: BURST_TIMEOUT_MS, requestTimeoutMs: BURST_TIMEOUT_MS });
        const ms = performance.now() - t0;
        checkVersion(r.stdout);
        return { ms, sandbox };
      }),
    );
    record("tti_burst_ms", results.map((x) => x.ms));
    await Promise.all(results.map((x) => x.sandbox.kill()));
  });
}
