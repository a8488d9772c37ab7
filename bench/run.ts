/**
 * `npm run bench [-- --json] [-- --quick]`: benchmarks on real microVMs, reported as the
 * project's bench contract says (one JSON object on stdout with --json; progress on stderr).
 */
import { readFileSync } from "node:fs";
import { cpus, release, totalmem } from "node:os";
import { parseArgs } from "node:util";
import { chooseAccel } from "../src/engine/accel.js";
import { MicroVm } from "../src/engine/qemu.js";
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
