/**
 * This host's identity as a snapshot sees it (`HostIdentity`, src/schema/host.ts): the QEMU
 * build, the machine type, the accelerator, the `-cpu` model QEMU gets and, where the guest sees
 * them, the host CPU's flags. The one place that decides them: QEMU's command line (./argv.ts),
 * the engine fingerprint (./fingerprint.ts), doctor, and the checks that refuse a snapshot of
 * another host all ask here.
 *
 * The CPU model: TCG emulates `max` (fully defined by the QEMU version). Under KVM the default is
 * a named baseline, so that a snapshot restores on any host of a mixed fleet that has its
 * features (`enforce` makes a host that lacks one refuse to start rather than run a guest that
 * would crash); `SUPERMACHINE_CPU` (read at every launch) overrides, e.g. `host` for a single
 * host or a fleet of identical ones, whose snapshots then also depend on the host's CPU flags.
 */
import { readFileSync } from "node:fs";
import { OptionError } from "../errors.js";
import { hostDifferences, hostMismatch, type HostIdentity } from "../schema/host.js";
import type { Accel } from "../schema/key.js";
import { chooseAccel, cpuFlagsOf } from "./accel.js";
import { qemuIdentity } from "./qemu-binary.js";

export type { HostIdentity } from "../schema/host.js";

/** The machine type every VM runs on (argv.ts adds its per-VM properties). */
export const MACHINE_TYPE = "microvm";
/** TCG's default CPU model: everything TCG can emulate. */
export const TCG_CPU = "max";
/**
 * KVM's default CPU model: Nehalem covers x86-64-v2 (SSE4.2, POPCNT, SSSE3, CX16, LAHF), which
 * practically every x86-64 server since 2009 has; AVX and AVX2 are not in it.
 */
export const KVM_BASELINE_CPU = "Nehalem-v1,enforce";
export const CPU_ENV = "SUPERMACHINE_CPU";

/** A `-cpu` argument: a model name, then `,property` or `,property=value` words. */
const CPU_ARG = /^[A-Za-z0-9][A-Za-z0-9_.-]*(,[A-Za-z0-9_.+-]+(=[A-Za-z0-9_.+-]+)?)*$/;

/** The `-cpu` argument VMs get under `accel`: `SUPERMACHINE_CPU`, else the accelerator's default. */
export function cpuModel(accel: Accel, env: NodeJS.ProcessEnv = process.env): string {
  const forced = env[CPU_ENV]?.trim();
  if (!forced) return accel === "kvm" ? KVM_BASELINE_CPU : TCG_CPU;
  if (!CPU_ARG.test(forced)) {
    throw new OptionError("OPTION_CPU_INVALID", `${CPU_ENV}=${JSON.stringify(forced)} is not a QEMU -cpu argument (a model name, then ,property or ,property=value words)`, {
      hint: `qemu-system-x86_64 -cpu help lists the models; e.g. ${CPU_ENV}=host (KVM only), ${CPU_ENV}=${KVM_BASELINE_CPU}`,
    });
  }
  if (accel !== "kvm" && modelOf(forced) === "host") {
    throw new OptionError("OPTION_CPU_INVALID", `${CPU_ENV}=${forced} needs KVM, and VMs run under TCG here`, {
      hint: `unset ${CPU_ENV} (TCG emulates "${TCG_CPU}") or name a model (qemu-system-x86_64 -cpu help)`,
    });
  }
  return forced;
}

const modelOf = (cpu: string): string => cpu.split(",")[0]!;

/** Whether the guest sees the host CPU's own features: KVM passing the host's CPU through. */
export const passesHostCpu = (accel: Accel, cpu: string): boolean => accel === "kvm" && (modelOf(cpu) === "host" || modelOf(cpu) === "max");

let flags: string[] | undefined;
/** The host CPU's flags, sorted and distinct (read once). */
export function hostCpuFlags(): string[] {
  if (!flags) {
    let line = "";
    try {
      line = cpuFlagsOf(readFileSync("/proc/cpuinfo", "utf8"));
    } catch {
      /* not Linux-like: no flags known */
    }
    flags = [...new Set(line.split(/\s+/).filter(Boolean))].sort();
  }
  return flags;
}

/**
 * This host's identity for VMs under `accel` (default: the accelerator the engine would use now),
 * with the CPU model `SUPERMACHINE_CPU` gives now.
 */
export function hostIdentity(accel?: Accel, env: NodeJS.ProcessEnv = process.env): HostIdentity {
  const a = accel ?? chooseAccel(env).accel;
  const cpu = cpuModel(a, env);
  return { qemu: qemuIdentity(), machine: MACHINE_TYPE, accel: a, cpu, ...(passesHostCpu(a, cpu) ? { cpuFlags: hostCpuFlags() } : {}) };
}

/**
 * Refuses (SNAPSHOT_HOST_MISMATCH) a snapshot whose recorded engine (`recorded`, its inputs'
 * engine) was another host's than this one under `accel`: QEMU would refuse its state, or worse,
 * run a guest on a CPU it was not made for. `what` names the snapshot.
 */
export function checkSnapshotHost(recorded: unknown, what: string, accel?: Accel): void {
  const diffs = hostDifferences(recorded, hostIdentity(accel));
  if (diffs.length) throw hostMismatch(what, diffs);
}
