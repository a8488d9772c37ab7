/**
 * QEMU's command line for a VM: the microvm machine, its devices (virtio block, rng, serial
 * ports for the agent), file-backed RAM for snapshots, the kernel command line, and the
 * descriptors QEMU inherits instead of opening files by path (see ./confine.ts).
 */
import { totalmem } from "node:os";
import { OptionError } from "../errors.js";
import type { Accel } from "./accel.js";
import { SANDBOX_OPTS } from "./confine.js";

export const AGENT_PORT_NAME = "supermachine.0";
/** The second agent port, for clients of the user's (`vm.execPath`). */
export const EXEC_PORT_NAME = "supermachine.1";

export interface VmSpec {
  /** Squashfs image attached read-only as the guest's root lower layer. */
  rootfs: string;
  memoryMib: number;
  vcpus: number;
  /** Deadline for the agent's first answer. */
  bootTimeoutMs?: number;
  /** Forces an accelerator (tests, benchmarks); default: `chooseAccel()`. */
  accel?: Accel;
  /** Extra kernel command-line words (debugging). */
  extraCmdline?: string[];
  /**
   * Guest RAM in a file instead of anonymous memory. `shared: true` writes guest memory to the
   * file (a VM that will be snapshotted); `false` maps it copy-on-write (a VM restored from a
   * snapshot: every restore shares the file's untouched pages, writes stay private).
   */
  memoryFile?: { path: string; shared: boolean };
  /** Restore: start paused and load this device-state file (QEMU migration stream) first. */
  incomingState?: string;
  /**
   * The engine that captured `incomingState` (its snapshot's `inputs.engine`): a host that
   * differs (./identity.ts) refuses the restore with SNAPSHOT_HOST_MISMATCH before QEMU starts.
   */
  capturedBy?: { engine: unknown; what: string };
  /** The state file is a complete stream with the RAM in it (`snapshot({ includeRam })`). */
  incomingHasRam?: boolean;
  /** Aborting it while the VM starts (spawn, restore, first answer) kills the process and rejects the start. */
  signal?: AbortSignal;
}

/** A spec's memory and CPUs, checked before anything starts. */
export function validateSpec(spec: VmSpec): void {
  // Guest RAM is committed lazily, but a guest larger than the host makes no sense, and with
  // file-backed RAM a huge size would become a huge file.
  const hostMib = Math.floor(totalmem() / (1024 * 1024));
  if (!Number.isInteger(spec.memoryMib) || spec.memoryMib < 64 || spec.memoryMib > hostMib) {
    throw new OptionError("OPTION_MEMORY_INVALID", `memoryMib ${spec.memoryMib} is not an integer between 64 and this host's ${hostMib} MiB`, {
      hint: "pass memoryMib in MiB, for example 256",
    });
  }
  if (!Number.isInteger(spec.vcpus) || spec.vcpus < 1 || spec.vcpus > 255) {
    throw new OptionError("OPTION_VCPUS_INVALID", `vcpus ${spec.vcpus} is not an integer between 1 and 255`);
  }
}

/** Kernel command line. `quiet` keeps the emulated UART (slow under TCG) out of the boot path. */
export function kernelCmdline(accel: Accel, vcpus: number, extra: string[] = []): string {
  return [
    "console=ttyS0",
    "quiet",
    "panic=-1",
    "reboot=t",
    "tsc=reliable",
    "no_timer_check",
    "noreplace-smp",
    // Skips the local APIC timer calibration (~300 ms under TCG; KVM calibrates quickly). Only
    // with one vCPU: secondary CPUs would be left without high-resolution timers.
    ...(accel === "tcg" && vcpus === 1 ? ["nolapic_timer"] : []),
    "random.trust_cpu=on",
    "sm.root=/dev/vda",
    `sm.port=${AGENT_PORT_NAME}`,
    `sm.exec_port=${EXEC_PORT_NAME}`,
    ...extra,
  ].join(" ");
}

/**
 * The descriptors a QEMU process inherits, by their number in it (3 and up: `spawnStdio`). The
 * kernel, initramfs and RAM file are reopened through /proc/self/fd (QEMU opens them by path);
 * the root disk and the console log go through fd sets, which QEMU dups without reopening.
 */
export const QEMU_FDS = { kernel: 3, initramfs: 4, rootfs: 5, console: 6, memory: 7 } as const;
const FDSET = { rootfs: 1, console: 2 } as const;

export function qemuArgs(o: {
  accel: Accel;
  /** The machine type and the `-cpu` argument (./identity.ts: `hostIdentity`). */
  machine: string;
  cpu: string;
  memoryMib: number;
  vcpus: number;
  qmpSock: string;
  agentSock: string;
  /** Unix socket QEMU listens on for the exec port. */
  execSock: string;
  cmdline: string;
  /** RAM in the file passed as QEMU_FDS.memory: written through (shared) or copy-on-write. */
  memoryFile?: { shared: boolean };
  incoming?: boolean;
  /** `-sandbox` (SANDBOX_OPTS); false only when unsandboxed. */
  sandbox: boolean;
}): string[] {
  // The PIT, PIC and RTC stay: without the PIT the guest cannot calibrate its TSC under TCG,
  // without the PIC it hangs early, without the RTC it stalls a second and starts in 1970.
  const machine = `${o.machine},acpi=off,x-option-roms=off` + (o.memoryFile ? ",memory-backend=mem" : "");
  const memory = o.memoryFile
    ? [
        "-object",
        `memory-backend-file,id=mem,size=${o.memoryMib}M,mem-path=/proc/self/fd/${QEMU_FDS.memory},share=${o.memoryFile.shared ? "on" : "off"}`,
      ]
    : [];
  return [
    ...(o.sandbox ? ["-sandbox", SANDBOX_OPTS] : []),
    ...memory,
    ...(o.incoming ? ["-incoming", "defer"] : []),
    "-M", machine,
    "-accel", o.accel === "kvm" ? "kvm" : "tcg",
    "-cpu", o.cpu,
    "-m", String(o.memoryMib),
    "-smp", String(o.vcpus),
    "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
    "-kernel", `/proc/self/fd/${QEMU_FDS.kernel}`,
    "-initrd", `/proc/self/fd/${QEMU_FDS.initramfs}`,
    "-append", o.cmdline,
    "-add-fd", `fd=${QEMU_FDS.console},set=${FDSET.console}`,
    "-serial", `file:/dev/fdset/${FDSET.console}`,
    "-add-fd", `fd=${QEMU_FDS.rootfs},set=${FDSET.rootfs}`,
    "-drive", `id=root,file=/dev/fdset/${FDSET.rootfs},format=raw,if=none,readonly=on`,
    "-device", "virtio-blk-device,drive=root",
    "-device", "virtio-rng-device",
    "-device", "virtio-serial-device,max_ports=3",
    "-chardev", `socket,id=agent,path=${o.agentSock},server=off`,
    "-device", `virtserialport,chardev=agent,name=${AGENT_PORT_NAME}`,
    "-chardev", `socket,id=exec,path=${o.execSock},server=on,wait=off`,
    "-device", `virtserialport,chardev=exec,name=${EXEC_PORT_NAME}`,
    "-chardev", `socket,id=qmp,path=${o.qmpSock},server=off`,
    "-mon", "chardev=qmp,mode=control",
  ];
}

