/**
 * Choice of QEMU accelerator. KVM is used only where the CPU advertises hardware
 * virtualization (vmx/svm) and /dev/kvm opens read-write; a kernel module such as kvm_pvm can
 * provide /dev/kvm without it, and guests then run far slower than under TCG (see the
 * project's host-virtualization notes). Everything else runs under TCG. `SUPERMACHINE_ACCEL`
 * forces one. The engine additionally falls back to TCG when a KVM boot fails (see vm.ts).
 */
import { accessSync, constants, existsSync, readFileSync } from "node:fs";
import { OptionError, listAccepted } from "../errors.js";
import { dropsPrivileges, lookupUser, qemuUserName } from "../private.js";
import type { Accel, AccelChoice } from "../schema/key.js";
import { kvmUsableBy } from "./confine.js";

export type { Accel, AccelChoice } from "../schema/key.js";
export const ACCELS: readonly Accel[] = ["kvm", "tcg"];


let probed: AccelChoice | undefined;
let kvmBroken: string | undefined;

export function chooseAccel(env: NodeJS.ProcessEnv = process.env): AccelChoice {
  const forced = env.SUPERMACHINE_ACCEL?.trim();
  if (forced) {
    if (!(ACCELS as readonly string[]).includes(forced)) {
      throw new OptionError("OPTION_ACCEL_INVALID", `SUPERMACHINE_ACCEL=${JSON.stringify(forced)} is not an accelerator`, {
        hint: `accepted values: ${listAccepted(ACCELS)}`,
      });
    }
    return { accel: forced as Accel, reason: "forced by SUPERMACHINE_ACCEL", forced: true };
  }
  if (kvmBroken) return { accel: "tcg", reason: `KVM boot failed earlier in this process: ${kvmBroken}`, forced: false };
  probed ??= probeHost();
  return probed;
}

/** Called by the engine when a KVM boot failed: later VMs in this process use TCG. */
export function markKvmBroken(why: string): void {
  kvmBroken = why;
}

/**
 * What the accelerator choice depends on, gathered by `hostAccelFacts` (and given by tests and
 * `supermachine doctor`, which explains the choice from the same facts).
 */
export interface HostAccelFacts {
  /** The `flags` line of /proc/cpuinfo ("" when unreadable). */
  cpuFlags: string;
  /** Whether /dev/kvm exists. */
  kvmDevice: boolean;
  /** Whether this process can open /dev/kvm read-write. */
  kvmReadWrite: boolean;
  /** Whether the kvm_pvm module is loaded (/sys/module/kvm_pvm). */
  pvmModule: boolean;
  /**
   * When this process is root and QEMU runs as another user: that user's name and whether it
   * can open /dev/kvm read-write; null otherwise.
   */
  qemuUser: { name: string; kvmReadWrite: boolean } | null;
}

/** The `flags` line of a /proc/cpuinfo text. */
export const cpuFlagsOf = (cpuinfo: string): string => /^flags\s*:(.*)$/m.exec(cpuinfo)?.[1] ?? "";
/** Whether CPU flags advertise hardware virtualization. */
export const hasHardwareVirt = (flags: string): boolean => /\b(vmx|svm)\b/.test(flags);

export function hostAccelFacts(env: NodeJS.ProcessEnv = process.env): HostAccelFacts {
  let cpuFlags = "";
  try {
    cpuFlags = cpuFlagsOf(readFileSync("/proc/cpuinfo", "utf8"));
  } catch {
    /* not Linux-like; TCG */
  }
  const kvmDevice = existsSync("/dev/kvm");
  let kvmReadWrite = false;
  if (kvmDevice) {
    try {
      accessSync("/dev/kvm", constants.R_OK | constants.W_OK);
      kvmReadWrite = true;
    } catch {
      /* not for this user */
    }
  }
  // As root, QEMU runs as an unprivileged user (confine.ts), which needs /dev/kvm itself.
  const user = dropsPrivileges(env) ? lookupUser(qemuUserName(env)) : null;
  return {
    cpuFlags,
    kvmDevice,
    kvmReadWrite,
    pvmModule: existsSync("/sys/module/kvm_pvm"),
    qemuUser: user ? { name: user.name, kvmReadWrite: kvmUsableBy(user) } : null,
  };
}

/** The accelerator the host's facts call for (SUPERMACHINE_ACCEL aside). */
export function decideAccel(f: HostAccelFacts): AccelChoice {
  if (!f.kvmDevice) return { accel: "tcg", reason: "no /dev/kvm", forced: false };
  if (!hasHardwareVirt(f.cpuFlags)) {
    const pvm = f.pvmModule ? " (the kvm_pvm module provides /dev/kvm without it)" : "";
    return { accel: "tcg", reason: `CPU has no vmx/svm flag${pvm}`, forced: false };
  }
  if (!f.kvmReadWrite) {
    return { accel: "tcg", reason: "/dev/kvm is not accessible read-write (add your user to the kvm group)", forced: false };
  }
  if (f.qemuUser && !f.qemuUser.kvmReadWrite) {
    return { accel: "tcg", reason: `/dev/kvm is not accessible read-write to ${f.qemuUser.name}, the user QEMU runs as (give /dev/kvm a group with rw, as Debian's kvm group)`, forced: false };
  }
  return { accel: "kvm", reason: "hardware virtualization available", forced: false };
}

function probeHost(): AccelChoice {
  return decideAccel(hostAccelFacts());
}
