/**
 * Benchmark group `runtimes`: `exec_roundtrip_ms` and `acquire_idle_ms` of a program on the public
 * API under Node, Bun and Deno (bench/runtime-probe.mjs, the runtimes from the package's
 * devDependencies), in the same run. The runtimes take turns, a round of each at a time, so that a
 * slow spell of the host weighs on all three; Node is measured the same way (a process of its own
 * running the same probe), so the ratios compare like with like. docs/runtimes.md has the table.
 */
import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import { join } from "node:path";
import { promisify } from "node:util";
import type { BenchGroup } from "../harness.js";

const run = promisify(execFile);
const ROOT = fileURLToPath(new URL("../../..", import.meta.url));
const PROBE = join(ROOT, "bench", "runtime-probe.mjs");
const RUNTIMES = {
  node: [process.execPath],
  bun: [join(ROOT, "node_modules", ".bin", "bun")],
  deno: [join(ROOT, "node_modules", ".bin", "deno"), "run", "-A"],
} as const;
type Name = keyof typeof RUNTIMES;
const NAMES = Object.keys(RUNTIMES) as Name[];

export const runtimesGroup: BenchGroup = {
  name: "runtimes",
  metrics: NAMES.flatMap((n) => [`exec_roundtrip_${n}_ms`, `acquire_idle_${n}_ms`]),
  async run(ctx) {
    const rounds = ctx.quick ? 1 : 3;
    const per = ctx.quick ? 100 : 200;
    const exec: Record<Name, number[]> = { node: [], bun: [], deno: [] };
    const acquire: Record<Name, number[]> = { node: [], bun: [], deno: [] };
    const versions: Partial<Record<Name, string>> = {};
    for (let round = 0; round < rounds; round++) {
      for (const name of NAMES) {
        const [cmd, ...args] = RUNTIMES[name];
        const { stdout } = await run(cmd, [...args, PROBE, String(per), String(per)], { cwd: ROOT, maxBuffer: 16 << 20, timeout: 300_000 });
        const line = stdout.trim().split("\n").pop() ?? "";
        const r = JSON.parse(line) as { runtime: string; exec: number[]; acquire: number[] };
        versions[name] = r.runtime;
        exec[name].push(...r.exec);
        acquire[name].push(...r.acquire);
      }
    }
    for (const name of NAMES) {
      ctx.record(`exec_roundtrip_${name}_ms`, exec[name]);
      ctx.record(`acquire_idle_${name}_ms`, acquire[name]);
    }
    const ratio = (xs: number[], peer: number[]) => (median(xs) / median(peer)).toFixed(2);
    ctx.progress(
      `runtimes (${NAMES.map((n) => versions[n]).join(", ")}): exec p50 ${NAMES.map((n) => `${n} ${median(exec[n]).toFixed(2)} ms`).join(", ")}; ` +
        `bun/node ${ratio(exec.bun, exec.node)}x, deno/node ${ratio(exec.deno, exec.node)}x. acquire p50 ${NAMES.map((n) => `${n} ${median(acquire[n]).toFixed(3)} ms`).join(", ")}`,
    );
  },
};

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)]!;
}
