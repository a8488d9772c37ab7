/** Benchmark group `pool-cycle`: acquire, exec and release in a loop, two callers, fresh VMs each time. */
import { setPhaseSink } from "../../src/phases.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const poolCycleGroup: BenchGroup = {
  name: "pool-cycle",
  metrics: ["pool_cycle_per_s", "cycle_qemu_cpu_ms", "cycle_host_cpu_ms"],
  run: (ctx) => poolCycleBenchmark(ctx),
};

/**
 * Two callers acquire, run `echo` and release (restoreOnRelease: each VM is thrown away and a new
 * one restored) for a fixed time: `pool_cycle_per_s`. The breakdown (issue 22) comes from the
 * engine's and the pool's phase reports (src/phases.ts) during the same loop, printed as a table:
 * the callers' own steps (acquire, exec, release, wall), the pool's work behind them (launch: a
 * spare taken or a restore; the QEMU process's spawn, state load and HELLO; the kill), and the CPU
 * that makes the ceiling on a small host: `cycle_qemu_cpu_ms`, the CPU one QEMU process used from
 * its start to its kill (median), and `cycle_host_cpu_ms`, this process's CPU per cycle.
 */
async function poolCycleBenchmark(ctx: BenchContext): Promise<void> {
  const { quick, record, recordValue, progress } = ctx;
  const image = await ctx.busybox();
  const seconds = quick ? 8 : 30;
  const pool = await image.pool({ min: 2, max: 2, restoreOnRelease: true });
  const phases = new Map<string, number[]>();
  const add = (phase: string, ms: number) => {
    let list = phases.get(phase);
    if (!list) phases.set(phase, (list = []));
    list.push(ms);
  };
  let cycles = 0;
  try {
    // Let the pool fill before the clock starts.
    const first = await pool.acquire();
    await first.release();
    const end = performance.now() + seconds * 1000;
    const worker = async () => {
      while (performance.now() < end) {
        let t = performance.now();
        const v = await pool.acquire();
        add("caller.acquire", performance.now() - t);
        t = performance.now();
        await v.exec({ argv: ["echo", "hi"] });
        add("caller.exec", performance.now() - t);
        t = performance.now();
        await v.release();
        add("caller.release", performance.now() - t);
        cycles++;
      }
    };
    setPhaseSink(add);
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    await Promise.all([worker(), worker()]);
    const wall = performance.now() - t0;
    const cpu = process.cpuUsage(cpu0);
    setPhaseSink(undefined);
    recordValue("pool_cycle_per_s", cycles / (wall / 1000), cycles, "cycles/s");
    const life = phases.get("qemu.cpu_life") ?? [];
    if (life.length === 0) throw new Error("no QEMU process was killed during the loop: no CPU figure");
    record("cycle_qemu_cpu_ms", life);
    recordValue("cycle_host_cpu_ms", Math.round(((cpu.user + cpu.system) / 1000 / cycles) * 100) / 100, cycles, "ms");
    progress(table(phases, cycles, wall));
  } finally {
    setPhaseSink(undefined);
    await pool.shutdown();
  }
}

/** The breakdown as a table: per phase, how often, the median, and the total per cycle. */
function table(phases: Map<string, number[]>, cycles: number, wallMs: number): string {
  const rows = [...phases.entries()].sort(([a], [b]) => a.localeCompare(b));
  const lines = [`pool cycle breakdown (${cycles} cycles in ${(wallMs / 1000).toFixed(1)} s, 2 callers; ms)`, "phase                 count   p50      per cycle"];
  for (const [phase, xs] of rows) {
    const sorted = [...xs].sort((a, b) => a - b);
    const p50 = sorted[Math.ceil(sorted.length / 2) - 1]!;
    const per = xs.reduce((a, b) => a + b, 0) / cycles;
    lines.push(`${phase.padEnd(20)} ${String(xs.length).padStart(6)} ${p50.toFixed(2).padStart(8)} ${per.toFixed(2).padStart(12)}`);
  }
  return lines.join("\n");
}
