/**
 * Where the time of a VM's life goes, phase by phase, for the benchmarks' breakdowns (a pool
 * cycle: QEMU's start, the state load, the agent's HELLO, the checkout, the kill; and the CPU
 * each QEMU process spent). Nothing is measured unless a sink is set (the bench sets one): each
 * instrumented step then reports its phase name and milliseconds. When off, a report costs one
 * check.
 */
import { readFileSync } from "node:fs";

/** Receives one measurement: a phase name (`engine.restore`, `qemu.cpu_to_ready`, ...) and milliseconds. */
export type PhaseSink = (phase: string, ms: number) => void;

let sink: PhaseSink | undefined;

/** @internal Sets (or, with undefined, clears) the process-wide sink. */
export function setPhaseSink(next: PhaseSink | undefined): void {
  sink = next;
}

/** Whether phases are being measured (to skip work done only for them). */
export function phasesOn(): boolean {
  return sink !== undefined;
}

/** Reports the time since `t0` (a `performance.now()` value) as `phase`. */
export function phaseSince(phase: string, t0: number): void {
  sink?.(phase, performance.now() - t0);
}

/** Reports a measured value as `phase`. */
export function reportPhase(phase: string, ms: number): void {
  sink?.(phase, ms);
}

/** Clock ticks per second of /proc's CPU times (USER_HZ: 100 on every Linux ABI the product runs on). */
const USER_HZ = 100;

/** CPU time (user + system) process `pid` has used so far, in ms; undefined when it cannot be read. */
export function processCpuMs(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const ticks = Number(fields[11]) + Number(fields[12]); // utime, stime (fields 14 and 15)
    return Number.isFinite(ticks) ? (ticks * 1000) / USER_HZ : undefined;
  } catch {
    return undefined;
  }
}
