/**
 * Benchmark group `serve`: time to interactive through `supermachine serve`, with the method of
 * the public cross-provider sandbox benchmark: `create()`, then the first command's output
 * (`python3 -V` on the python fixture), sandbox killed after. Sequentially through the unchanged
 * `e2b` SDK and through the package's own remote client (`connect()`: acquire, exec, release);
 * 100 (quick: 20) creates at once through the SDK on a pool kept that warm (min 100), each
 * one's time from the burst's start; and, in the same run, the peer: `acquire()` + `exec()` in
 * process of the very command the SDK sends (`bash -l -c "python3 -V"`: a login shell's first
 * start in a fresh VM is most of the time under TCG), so the ratio is the server's and the SDK's
 * overhead. The server runs in this process on loopback, so the figures hold no network.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Image } from "../../src/runtime/image.js";
import { KeyStore } from "../../src/server/keys.js";
import { startServer } from "../../src/server/index.js";
import { connect } from "../../src/remote/index.js";
import { fixtures } from "../util.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const serveGroup: BenchGroup = {
  name: "serve",
  metrics: ["tti_e2b_ms", "tti_connect_ms", "tti_burst_ms", "tti_inprocess_ms"],
  run: (ctx) => serveBenchmarks(ctx),
};

async function serveBenchmarks(ctx: BenchContext): Promise<void> {
  const { quick, record, progress } = ctx;
  const fx = await (await fixtures()).ensureFixtures({ only: ["python"], log: progress });
  const n = quick ? 20 : 100;
  const burst = quick ? 20 : 100;
  const dir = mkdtempSync(join(tmpdir(), "sm-bench-serve-"));
  writeFileSync(
    join(dir, "supermachine.config.ts"),
    `import { defineConfig, defineImage } from "supermachine/config";
export default defineConfig({
  images: { python: defineImage({ ref: ${JSON.stringify(fx.python.ref)} }) },
  pools: {
    python: { image: "python", min: 2, max: 4 },
    burst: { image: "python", min: ${burst}, max: ${burst}, acquireTimeoutMs: 300000 },
  },
});
`,
  );
  const keys = new KeyStore(join(dir, "keys.json"));
  const { key } = await keys.create({ name: "bench" });
  progress("serve: starting the server (bakes the python image if needed)");
  const server = await startServer({ cwd: dir, listen: "127.0.0.1:0", keys: keys.path, logLevel: "silent" });
  const saved = { url: process.env.E2B_API_URL, sandbox: process.env.E2B_SANDBOX_URL, key: process.env.E2B_API_KEY };
  try {
    await server.ready;
    process.env.E2B_API_URL = server.url;
    process.env.E2B_SANDBOX_URL = server.url;
    process.env.E2B_API_KEY = key;
    const { Sandbox } = await import("e2b");
    const tti = async (): Promise<number> => {
      const t0 = performance.now();
      const sandbox = await Sandbox.create("python");
      const r = await sandbox.commands.run("python3 -V");
      const ms = performance.now() - t0;
      if (!/^Python 3\./.test(r.stdout)) throw new Error(`python3 -V printed ${JSON.stringify(r.stdout)}`);
      await sandbox.kill();
      return ms;
    };
    for (let i = 0; i < 3; i++) await tti(); // the first restores and the SDK's connections
    const seq: number[] = [];
    for (let i = 0; i < n; i++) seq.push(await tti());
    record("tti_e2b_ms", seq);

    // The remote client, on the same pool, running the same command line as the SDK.
    const remote = await connect(server.url, { apiKey: key });
    try {
      const viaConnect: number[] = [];
      for (let i = 0; i < n + 3; i++) {
        const t0 = performance.now();
        const vm = await remote.python!.acquire();
        const r = await vm.exec({ argv: ["bash", "-l", "-c", "python3 -V"] });
        const ms = performance.now() - t0;
        if (!/^Python 3\./.test(r.stdout.toString())) throw new Error(`python3 -V printed ${JSON.stringify(r.stdout.toString())}`);
        await vm.release();
        if (i >= 3) viaConnect.push(ms);
      }
      record("tti_connect_ms", viaConnect);
    } finally {
      await remote.close();
    }

    // The peer: the same pool's image, in process.
    const image = await Image.build({ ref: fx.python.ref });
    const pool = await image.pool({ min: 2, max: 2 });
    try {
      const local: number[] = [];
      for (let i = 0; i < n + 3; i++) {
        const t0 = performance.now();
        const vm = await pool.acquire();
        const r = await vm.exec({ argv: ["bash", "-l", "-c", "python3 -V"] });
        const ms = performance.now() - t0;
        if (!/^Python 3\./.test(r.stdout.toString())) throw new Error(`python3 -V printed ${JSON.stringify(r.stdout.toString())}`);
        await vm.release();
        if (i >= 3) local.push(ms);
      }
      record("tti_inprocess_ms", local);
    } finally {
      await pool.shutdown();
    }

    progress(`serve: ${burst} creates at once`);
    const t0 = performance.now();
    const times = await Promise.all(
      Array.from({ length: burst }, async () => {
        const sandbox = await Sandbox.create("burst");
        const r = await sandbox.commands.run("python3 -V");
        const ms = performance.now() - t0;
        if (!/^Python 3\./.test(r.stdout)) throw new Error(`python3 -V printed ${JSON.stringify(r.stdout)}`);
        return { ms, sandbox };
      }),
    );
    record("tti_burst_ms", times.map((x) => x.ms));
    await Promise.all(times.map((x) => x.sandbox.kill()));
  } finally {
    if (saved.url === undefined) delete process.env.E2B_API_URL;
    else process.env.E2B_API_URL = saved.url;
    if (saved.sandbox === undefined) delete process.env.E2B_SANDBOX_URL;
    else process.env.E2B_SANDBOX_URL = saved.sandbox;
    if (saved.key === undefined) delete process.env.E2B_API_KEY;
    else process.env.E2B_API_KEY = saved.key;
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  }
}
