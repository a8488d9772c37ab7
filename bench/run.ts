/**
 * `npm run bench [-- --json] [-- --quick]`: benchmarks on real microVMs, reported as the
 * project's bench contract says (one JSON object on stdout with --json; progress on stderr).
 */
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer, type AddressInfo } from "node:net";
import { cpus, release, tmpdir, totalmem } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { chooseAccel } from "../src/engine/accel.js";
import { packageRoot } from "../src/engine/artifacts.js";
import { MicroVm } from "../src/engine/qemu.js";
import { resolveImage } from "../src/image/store.js";
import { Image } from "../src/runtime/image.js";

interface Metric {
  p50?: number;
  p99?: number;
  value?: number;
  n: number;
  unit: string;
}

const { values } = parseArgs({ options: { json: { type: "boolean" }, quick: { type: "boolean" } } });
const quick = values.quick ?? false;
const results: Record<string, Metric> = {};
const progress = (m: string) => process.stderr.write(`[bench] ${m}\n`);

function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i]!;
}

function record(name: string, samples: number[], unit = "ms"): void {
  const s = [...samples].sort((a, b) => a - b);
  const round = (x: number) => Math.round(x * 1000) / 1000;
  results[name] = { p50: round(quantile(s, 0.5)), p99: round(quantile(s, 0.99)), n: s.length, unit };
  progress(`${name}: p50 ${results[name]!.p50} ${unit}, p99 ${results[name]!.p99} ${unit} (n=${s.length})`);
}

function recordValue(name: string, value: number, n: number, unit: string): void {
  results[name] = { value: Math.round(value * 100) / 100, n, unit };
  progress(`${name}: ${results[name]!.value} ${unit}`);
}

async function skip(name: string, fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (err) {
    progress(`${name}: not measured: ${(err as Error).message}`);
  }
}

/** RSS and PSS of one process, from smaps_rollup (kB → MiB). */
function memoryOf(pid: number): { rss: number; pss: number } {
  const text = readFileSync(`/proc/${pid}/smaps_rollup`, "utf8");
  const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? NaN);
  return { rss: kb("Rss") / 1024, pss: kb("Pss") / 1024 };
}

const image = await Image.build({ ref: "builtin:busybox" });
const spec = { rootfs: image.rootfsPath, memoryMib: image.memoryMib, vcpus: image.vcpus };

await skip("boot_to_ready_ms", async () => {
  const n = quick ? 3 : 10;
  const samples: number[] = [];
  for (let i = 0; i < n; i++) {
    const vm = await MicroVm.launch(spec);
    samples.push(vm.bootMs);
    await vm.kill();
  }
  record("boot_to_ready_ms", samples);
});

const pool = await image.pool({ min: 1, max: 1 });
const vm = await pool.acquire();
const agent = vm.machine.agent;

await skip("ping_roundtrip_ms", async () => {
  const n = quick ? 300 : 1000;
  for (let i = 0; i < 50; i++) await agent.ping();
  const samples: number[] = [];
  for (let i = 0; i < n; i++) samples.push(await agent.ping());
  record("ping_roundtrip_ms", samples);
});

await skip("guest_spawn_floor_ms", async () => {
  const n = quick ? 100 : 300;
  await agent.spawnBench(["/bin/true"], 10);
  record("guest_spawn_floor_ms", await agent.spawnBench(["/bin/true"], n));
});

await skip("exec_roundtrip_ms", async () => {
  const n = quick ? 150 : 1000;
  for (let i = 0; i < 20; i++) await vm.exec({ argv: ["echo", "hi"] });
  const samples: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    const r = await vm.exec({ argv: ["echo", "hi"] });
    samples.push(performance.now() - t0);
    if (r.exitCode !== 0) throw new Error(`echo exited ${r.exitCode}`);
  }
  record("exec_roundtrip_ms", samples);
});

await skip("vm_rss_mib", async () => {
  await new Promise((r) => setTimeout(r, 2_000));
  const m = memoryOf(vm.pid);
  recordValue("vm_rss_mib", m.rss, 1, "MiB");
  recordValue("vm_pss_mib", m.pss, 1, "MiB");
});

await vm.release();
await pool.shutdown();

await skip("pull_python_ms", () => registryBenchmarks());

/**
 * Pull figures against a real registry on loopback (Debian's docker-registry) holding the
 * python fixture image: a cold pull into an empty store (network, verification, squashfs), and
 * Image.build of an image that is already local.
 */
async function registryBenchmarks(): Promise<void> {
  const root = packageRoot();
  const fixturesMod = pathToFileURL(join(root, "test/fixtures/build-fixtures.mjs")).href;
  const registryMod = pathToFileURL(join(root, "test/fixtures/registry-config.mjs")).href;
  const { ensureFixtures } = (await import(fixturesMod)) as {
    ensureFixtures(o: { only: string[]; log: (l: string) => void }): Promise<{ python: { layout: string; tag: string } }>;
  };
  const { writeRegistryConfig } = (await import(registryMod)) as {
    writeRegistryConfig(o: { dir: string; port: number }): string;
  };
  const fx = await ensureFixtures({ only: ["python"], log: progress });
  const dir = mkdtempSync(join(tmpdir(), "sm-bench-registry-"));
  const port = await freePort();
  const registry = spawn("docker-registry", ["serve", writeRegistryConfig({ dir, port })], { stdio: "ignore" });
  const homes: string[] = [];
  try {
    await waitForHttp(`http://127.0.0.1:${port}/v2/`);
    execFileSync("skopeo", ["copy", "--quiet", "--dest-tls-verify=false", `oci:${fx.python.layout}:${fx.python.tag}`, `docker://127.0.0.1:${port}/library/python:3-bookworm`]);
    const ref = `127.0.0.1:${port}/library/python:3-bookworm`;
    const cold: number[] = [];
    for (let i = 0; i < (quick ? 1 : 3); i++) {
      const home = mkdtempSync(join(tmpdir(), "sm-bench-home-"));
      homes.push(home);
      const t0 = performance.now();
      await resolveImage(ref, { home });
      cold.push(performance.now() - t0);
    }
    record("pull_python_ms", cold);
    const saved = process.env.SUPERMACHINE_HOME;
    process.env.SUPERMACHINE_HOME = homes[0]!;
    try {
      const cached: number[] = [];
      for (let i = 0; i < (quick ? 30 : 100); i++) {
        const t0 = performance.now();
        await Image.build({ ref });
        cached.push(performance.now() - t0);
      }
      record("build_cached_image_ms", cached);
    } finally {
      if (saved === undefined) delete process.env.SUPERMACHINE_HOME;
      else process.env.SUPERMACHINE_HOME = saved;
    }
  } finally {
    registry.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
    for (const h of homes) rmSync(h, { recursive: true, force: true });
  }
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

async function waitForHttp(url: string, ms = 15_000): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    try {
      const r = await fetch(url);
      if (r.status < 500) return;
    } catch {
      /* not listening yet */
    }
    if (Date.now() > end) throw new Error(`${url} did not answer within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const report = {
  accel: chooseAccel().accel,
  host: { cpus: cpus().length, memGiB: Math.round(totalmem() / 2 ** 30), kernel: release() },
  results,
};
if (values.json) process.stdout.write(JSON.stringify(report, null, 2) + "\n");
else {
  for (const [k, m] of Object.entries(results)) {
    process.stdout.write(`${k.padEnd(26)} ${m.value !== undefined ? `${m.value} ${m.unit}` : `p50 ${m.p50} ${m.unit}  p99 ${m.p99} ${m.unit}  n=${m.n}`}\n`);
  }
}
