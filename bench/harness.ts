/**
 * The benchmark harness (the project's bench contract: one JSON object on stdout with --json,
 * progress on stderr): groups of benchmarks, each promising the metrics it records, run in
 * turn. A group that throws, or ends without recording a metric it promised, leaves each missing
 * metric under `failed` with the reason, and the bench exits non-zero once every group has run:
 * a gap in the figures is never silent.
 */
import { cpus, release, totalmem } from "node:os";
import type { Image } from "../src/runtime/image.js";
import type { Vm } from "../src/runtime/vm.js";

export interface Metric {
  p50?: number;
  p99?: number;
  value?: number;
  n: number;
  unit: string;
}

export interface Failure {
  metric: string;
  reason: string;
}

/** What a group is given. */
export interface BenchContext {
  quick: boolean;
  /** Records samples of `name` (p50, p99, n). */
  record(name: string, samples: number[], unit?: string): void;
  /** Records a single figure of `name` (a size, a rate, a count). */
  recordValue(name: string, value: number, n: number, unit: string): void;
  progress(message: string): void;
  /** The built-in busybox image, built once for every group. */
  busybox(): Promise<Image>;
  /** One VM of busybox that the groups marked `sharedVm` use in turn (released after the last of them). */
  sharedVm(): Promise<Vm>;
}

export interface BenchGroup {
  name: string;
  /** The metrics it records, every one of them, or the bench fails naming those missing. */
  metrics: readonly string[];
  /** Uses `ctx.sharedVm()`: runs before the shared VM is released. */
  sharedVm?: boolean;
  run(ctx: BenchContext): Promise<void>;
}

export interface BenchReport {
  accel: string;
  host: { cpus: number; memGiB: number; kernel: string };
  results: Record<string, Metric>;
  failed?: Failure[];
}

export function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i]!;
}

/** Whether `--only <text>` keeps a group: the text is in its name or in one of its metrics. */
export const selected = (g: BenchGroup, only: string | undefined): boolean => !only || g.name.includes(only) || g.metrics.some((m) => m.includes(only));

export interface RunOptions {
  quick: boolean;
  only?: string | undefined;
  progress?: (message: string) => void;
  busybox: () => Promise<Image>;
  /** A VM for the `sharedVm` groups, and how to give it back. */
  sharedVm: () => Promise<{ vm: Vm; close(): Promise<void> }>;
  accel: () => string;
}

/** Runs the selected groups in order; resolves with the report and the exit status (1 when a metric failed). */
export async function runGroups(groups: readonly BenchGroup[], o: RunOptions): Promise<{ report: BenchReport; status: number }> {
  const progress = o.progress ?? ((m: string) => process.stderr.write(`[bench] ${m}\n`));
  const results: Record<string, Metric> = {};
  const failed: Failure[] = [];
  let current: BenchGroup | undefined;
  const own = (name: string) => {
    if (!current?.metrics.includes(name)) throw new Error(`benchmark group ${current?.name} records ${name}, which it does not promise (add it to its metrics)`);
  };
  let image: Promise<Image> | undefined;
  let shared: Promise<{ vm: Vm; close(): Promise<void> }> | undefined;
  const closeShared = async () => {
    const s = shared;
    shared = undefined;
    if (s) await (await s.catch(() => undefined))?.close();
  };
  const ctx: BenchContext = {
    quick: o.quick,
    progress,
    record(name, samples, unit = "ms") {
      own(name);
      const s = [...samples].sort((a, b) => a - b);
      const round = (x: number) => Math.round(x * 1000) / 1000;
      const m = { p50: round(quantile(s, 0.5)), p99: round(quantile(s, 0.99)), n: s.length, unit };
      if (s.length === 0 || !Number.isFinite(m.p50)) throw new Error(`${name}: no valid sample`);
      results[name] = m;
      progress(`${name}: p50 ${m.p50} ${unit}, p99 ${m.p99} ${unit} (n=${s.length})`);
    },
    recordValue(name, value, n, unit) {
      own(name);
      if (!Number.isFinite(value)) throw new Error(`${name}: not a number (${value})`);
      results[name] = { value: Math.round(value * 100) / 100, n, unit };
      progress(`${name}: ${results[name]!.value} ${unit}`);
    },
    busybox: () => (image ??= o.busybox()),
    sharedVm: async () => (await (shared ??= o.sharedVm())).vm,
  };
  for (const g of groups) {
    if (!selected(g, o.only)) continue;
    if (!g.sharedVm) await closeShared();
    current = g;
    let reason = "the group ended without recording it";
    try {
      await g.run(ctx);
    } catch (err) {
      reason = (err as Error).message.split("\n")[0] ?? String(err);
    }
    for (const metric of g.metrics) {
      if (results[metric]) continue;
      failed.push({ metric, reason });
      progress(`${metric}: NOT MEASURED (group ${g.name}): ${reason}`);
    }
  }
  current = undefined;
  await closeShared();
  const report: BenchReport = {
    accel: o.accel(),
    host: { cpus: cpus().length, memGiB: Math.round(totalmem() / 2 ** 30), kernel: release() },
    results,
    ...(failed.length ? { failed } : {}),
  };
  return { report, status: failed.length ? 1 : 0 };
}

/** The report as text: one line per metric, then what failed. */
export function formatReport(report: BenchReport): string {
  const lines = Object.entries(report.results).map(([k, m]) => `${k.padEnd(26)} ${m.value !== undefined ? `${m.value} ${m.unit}` : `p50 ${m.p50} ${m.unit}  p99 ${m.p99} ${m.unit}  n=${m.n}`}`);
  for (const f of report.failed ?? []) lines.push(`${f.metric.padEnd(26)} FAILED: ${f.reason}`);
  return lines.join("\n") + "\n";
}
