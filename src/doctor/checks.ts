/**
 * The checks of `supermachine doctor`, as pure functions of the facts they judge: each takes what
 * was read from the host (gathered in `./index.ts`) and returns one pass/warn/fail line with a
 * concrete fix, so every case can be tested with made-up facts. `warn`: VMs work, but not as well
 * as they could (TCG, a cache other users can read); `fail`: VMs cannot start as configured.
 */
import semver from "semver";
import { ACCELS, decideAccel, hasHardwareVirt, type HostAccelFacts } from "../engine/accel.js";
import type { NativeArtifacts } from "../engine/artifacts.js";
import type { ConfinementReport } from "../engine/confine.js";
import type { HostIdentity } from "../schema/host.js";
import { describeJsRuntime, RUNTIME_LABELS, RUNTIME_MINIMUMS, runtimeProblem, type JsRuntime } from "../js-runtime.js";

export type CheckStatus = "pass" | "warn" | "fail";

export interface Check {
  id: string;
  status: CheckStatus;
  summary: string;
  detail?: string;
  fix?: string;
}

export interface DoctorReport {
  checks: Check[];
  /** This host's identity as snapshots record it (null when it cannot be read: see the identity check). */
  identity: HostIdentity | null;
  /** No check failed (warnings allowed). */
  ok: boolean;
}

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
/** Below this much free space in the cache, doctor warns (a kernel build or a few images and snapshots fill it). */
export const LOW_SPACE_WARN = 2 * GiB;
/** Below this, a bake cannot write a RAM file. */
export const LOW_SPACE_FAIL = 256 * MiB;
/** The QEMU the project is developed and tested with (Debian 12's). */
export const TESTED_QEMU = "7.2.0";

const octal = (mode: number) => "0" + (mode & 0o777).toString(8).padStart(3, "0");
const gib = (n: number) => `${(n / GiB).toFixed(1)} GiB`;

// ---- The JavaScript runtime ----------------------------------------------------------------------

/**
 * Node against the package's engines range; Bun and Deno against their oldest supported release
 * (src/js-runtime.ts). Under Bun and Deno `process.versions.node` is the Node API they emulate,
 * not a Node install, so it is reported beside the runtime's own version.
 */
export function checkRuntime(f: { runtime: JsRuntime; engines: string | undefined }): Check {
  const rt = f.runtime;
  const id = "runtime";
  if (rt.name !== "node") {
    const problem = runtimeProblem({ runtime: rt });
    const summary = `${describeJsRuntime(rt)} (Node API ${rt.nodeApi})`;
    if (problem) return { id, status: "fail", summary: `${summary}: ${problem.message}`, ...(problem.hint ? { fix: problem.hint } : {}) };
    return { id, status: "pass", summary: `${summary}, supported from ${RUNTIME_LABELS[rt.name]} ${RUNTIME_MINIMUMS[rt.name].version}` };
  }
  const v = rt.version;
  if (!f.engines) return { id, status: "pass", summary: `Node ${v} (the package declares no engines range)` };
  if (!semver.validRange(f.engines)) {
    return { id, status: "warn", summary: `Node ${v}; the package's engines range ${JSON.stringify(f.engines)} is not a valid range`, fix: "reinstall supermachine (its package.json looks damaged)" };
  }
  if (semver.satisfies(v, f.engines)) return { id, status: "pass", summary: `Node ${v} satisfies engines ${f.engines}` };
  return {
    id,
    status: "fail",
    summary: `Node ${v} does not satisfy the package's engines ${f.engines}`,
    fix: `install a Node.js that satisfies ${f.engines} (for example from https://nodejs.org or nvm) and run supermachine with it`,
  };
}

// ---- QEMU ----------------------------------------------------------------------------------------

export interface QemuFacts {
  /** The binary run (SUPERMACHINE_QEMU or qemu-system-x86_64). */
  binary: string;
  /** Output of `<binary> --version`, or null when it could not be run. */
  versionOutput: string | null;
  /** Why it could not be run. */
  error?: string;
  /** Output of `<binary> -machine help`, or null when not known. */
  machines: string | null;
}

export const qemuVersionOf = (versionOutput: string): string | null => /version (\d+\.\d+(?:\.\d+)?)/.exec(versionOutput)?.[1] ?? null;

export function checkQemu(f: QemuFacts): Check {
  const install = "sudo apt-get install qemu-system-x86 (Debian/Ubuntu), or set SUPERMACHINE_QEMU to a qemu-system-x86_64 binary";
  if (f.versionOutput === null) {
    return { id: "qemu", status: "fail", summary: `QEMU cannot be run: ${f.binary}`, detail: f.error, fix: install };
  }
  const line = f.versionOutput.split("\n")[0]!.trim();
  const version = qemuVersionOf(line);
  if (f.machines !== null && !/^microvm\b/m.test(f.machines)) {
    return { id: "qemu", status: "fail", summary: `${f.binary} (${line}) has no microvm machine type`, fix: install };
  }
  if (!version) return { id: "qemu", status: "warn", summary: `${f.binary}: cannot read a version from ${JSON.stringify(line)}`, fix: install };
  const v = semver.coerce(version)!;
  if (semver.lt(v, TESTED_QEMU)) {
    return {
      id: "qemu",
      status: "warn",
      summary: `QEMU ${version} is older than ${TESTED_QEMU}, the version supermachine is tested with`,
      detail: `${f.binary}: ${line}`,
      fix: `install QEMU ${TESTED_QEMU} or newer (Debian 12's qemu-system-x86), or point SUPERMACHINE_QEMU at one`,
    };
  }
  return { id: "qemu", status: "pass", summary: `QEMU ${version} (${f.binary}), microvm machine available`, detail: line };
}

// ---- accelerator ---------------------------------------------------------------------------------

const NO_HW_FIX =
  "nothing to fix on this host: VMs run under TCG, emulated (boots of about a second, exec round trips of milliseconds); " +
  "for KVM speed, run on bare metal or a VM with nested virtualization enabled (vmx/svm visible in /proc/cpuinfo)";

function accelDetail(f: HostAccelFacts): string {
  const hw = hasHardwareVirt(f.cpuFlags);
  const flag = /\b(vmx|svm)\b/.exec(f.cpuFlags)?.[1];
  return [
    `CPU flags: ${hw ? `${flag} present` : "no vmx/svm"}${/\bhypervisor\b/.test(f.cpuFlags) ? " (running under a hypervisor)" : ""}`,
    `/dev/kvm: ${f.kvmDevice ? `present, ${f.kvmReadWrite ? "" : "not "}read-write for this process` : "absent"}`,
    `kvm_pvm module: ${f.pvmModule ? "loaded" : "not loaded"}`,
    ...(f.qemuUser ? [`QEMU's user ${f.qemuUser.name}: ${f.qemuUser.kvmReadWrite ? "can" : "cannot"} open /dev/kvm read-write`] : []),
  ].join("; ");
}

/** `forced`: SUPERMACHINE_ACCEL, when set. */
export function checkAccel(f: HostAccelFacts, forced: string | undefined): Check {
  const choice = decideAccel(f);
  const detail = accelDetail(f);
  const hw = hasHardwareVirt(f.cpuFlags);
  if (forced) {
    if (!(ACCELS as readonly string[]).includes(forced)) {
      return { id: "accel", status: "fail", summary: `SUPERMACHINE_ACCEL=${JSON.stringify(forced)} is not an accelerator`, detail, fix: `set SUPERMACHINE_ACCEL to kvm or tcg, or unset it (the host calls for ${choice.accel}: ${choice.reason})` };
    }
    if (forced === choice.accel) return { id: "accel", status: "pass", summary: `${forced}: forced by SUPERMACHINE_ACCEL, as the host calls for (${choice.reason})`, detail };
    return {
      id: "accel",
      status: "warn",
      summary: `${forced}: forced by SUPERMACHINE_ACCEL, but the host calls for ${choice.accel} (${choice.reason})`,
      detail: forced === "kvm" ? `${detail}; a KVM boot that fails makes the process fall back to TCG` : detail,
      fix: "unset SUPERMACHINE_ACCEL to let supermachine choose",
    };
  }
  if (choice.accel === "kvm") {
    if (f.pvmModule) {
      return {
        id: "accel",
        status: "warn",
        summary: "kvm: hardware virtualization available, but the kvm_pvm module is loaded too",
        detail: `${detail}; if /dev/kvm is PVM's, guests run far slower than under TCG`,
        fix: "if VMs are slow, set SUPERMACHINE_ACCEL=tcg (or unload kvm_pvm)",
      };
    }
    return { id: "accel", status: "pass", summary: `kvm: ${choice.reason}`, detail };
  }
  let fix: string;
  let why = detail;
  if (!hw) {
    fix = NO_HW_FIX;
    if (f.kvmDevice) {
      why += f.pvmModule
        ? "; this /dev/kvm is PVM's (kvm_pvm, paravirtualized KVM without hardware support): guests run far slower under it than under TCG, so supermachine does not use it"
        : "; a /dev/kvm without vmx/svm is not hardware KVM: supermachine does not use it";
    }
  } else if (!f.kvmDevice) {
    fix = "load KVM: sudo modprobe kvm_intel (or kvm_amd on AMD), and check that virtualization is enabled in the firmware";
  } else if (!f.kvmReadWrite) {
    fix = "give your user access to /dev/kvm: see the kvm-group check";
  } else {
    fix = `let QEMU's user ${f.qemuUser?.name ?? ""} open /dev/kvm: sudo chgrp kvm /dev/kvm && sudo chmod 660 /dev/kvm (Debian's udev rule for the kvm group does this at boot)`;
  }
  return { id: "accel", status: "warn", summary: `tcg: ${choice.reason}`, detail: why, fix };
}

// ---- /dev/kvm group membership -------------------------------------------------------------------

export interface KvmGroupFacts {
  /** This process's uid, name and groups (process.getgroups()). */
  uid: number;
  userName: string;
  groups: number[];
  /** stat of /dev/kvm, or null when there is none. */
  device: { uid: number; gid: number; mode: number } | null;
  /** The device's group: its name and members as the group database lists them, when known. */
  group: { name: string; members: string[] } | null;
  hardwareVirt: boolean;
  /** Whether this process opens /dev/kvm read-write. */
  readWrite: boolean;
}

export function checkKvmGroup(f: KvmGroupFacts): Check {
  const id = "kvm-group";
  if (!f.device) return { id, status: "pass", summary: "not needed: there is no /dev/kvm" };
  const dev = `/dev/kvm (${octal(f.device.mode)}, uid ${f.device.uid}, group ${f.group?.name ?? f.device.gid})`;
  if (!f.hardwareVirt) return { id, status: "pass", summary: "not needed: the CPU has no vmx/svm, so VMs use TCG whatever /dev/kvm allows", detail: dev };
  if (f.uid === 0) return { id, status: "pass", summary: "not needed: this process runs as root (the accel check covers QEMU's own user)", detail: dev };
  if (f.readWrite) {
    const via = f.device.uid === f.uid ? "as its owner" : f.groups.includes(f.device.gid) ? `through group ${f.group?.name ?? f.device.gid}` : "(open to everyone)";
    return { id, status: "pass", summary: `${f.userName} opens /dev/kvm read-write ${via}`, detail: dev };
  }
  const groupRw = (f.device.mode & 0o060) === 0o060;
  const name = f.group?.name ?? String(f.device.gid);
  if (!groupRw) {
    return {
      id,
      status: "warn",
      summary: `no group may open ${dev}: VMs run under TCG`,
      fix: "sudo chgrp kvm /dev/kvm && sudo chmod 660 /dev/kvm (Debian's udev rule for the kvm group does this at boot), then: sudo usermod -aG kvm " + f.userName,
    };
  }
  if (!f.groups.includes(f.device.gid)) {
    if (f.group?.members.includes(f.userName)) {
      return {
        id,
        status: "warn",
        summary: `${f.userName} is in group ${name}, but this session started before that: /dev/kvm is not open to it yet, VMs run under TCG`,
        detail: dev,
        fix: `log out and back in (or start a shell with: newgrp ${name})`,
      };
    }
    return {
      id,
      status: "warn",
      summary: `${f.userName} is not in group ${name}, which may open /dev/kvm: VMs run under TCG`,
      detail: dev,
      fix: `sudo usermod -aG ${name} ${f.userName}, then log out and back in`,
    };
  }
  return { id, status: "warn", summary: `${f.userName} is in group ${name} but cannot open ${dev}`, fix: "check /dev/kvm's ACLs and any security module (AppArmor, SELinux) that denies it" };
}

// ---- kernel and agent ----------------------------------------------------------------------------

/** What looking the artifacts up gave: them, or the error (a SetupError's code, message and hint). */
export type ArtifactsFacts = { artifacts: NativeArtifacts } | { error: { code: string; message: string; hint?: string } };

/** The `Linux version x.y.z` banner in an uncompressed kernel image. */
export function kernelVersionOf(image: Buffer): string | null {
  const at = image.indexOf("Linux version ");
  if (at < 0) return null;
  return /^Linux version (\S+)/.exec(image.subarray(at, at + 200).toString("latin1"))?.[1] ?? null;
}

export function checkKernel(a: ArtifactsFacts, kernelVersion: string | null): Check {
  if ("error" in a) {
    if (a.error.code === "SETUP_AGENT_MISSING") return { id: "kernel", status: "pass", summary: "guest kernel found (see the agent check)" };
    return { id: "kernel", status: "fail", summary: a.error.message, detail: a.error.code, fix: a.error.hint };
  }
  const k = a.artifacts;
  const custom = k.kernelKey.startsWith("custom:");
  return {
    id: "kernel",
    status: "pass",
    summary: `guest kernel ${kernelVersion ? `Linux ${kernelVersion}` : "(version not readable)"}${custom ? ", from SUPERMACHINE_KERNEL" : `${k.kernelSource === "prebuilt" ? ", prebuilt package" : ""}, key ${k.kernelKey}`}`,
    detail: k.kernel,
  };
}

/** `supermachine-agent --version` output: `supermachine-agent 0.1.0 (protocol 5)`. */
export function agentVersionOf(output: string): { version: string; protocol: number } | null {
  const m = /supermachine-agent (\S+) \(protocol (\d+)\)/.exec(output);
  return m ? { version: m[1]!, protocol: Number(m[2]) } : null;
}

/** `agentOutput`: what the agent binary next to the initramfs printed for --version (null: none there). */
export function checkAgent(a: ArtifactsFacts, agentOutput: string | null, hostProtocol: number): Check {
  if ("error" in a) {
    if (a.error.code === "SETUP_KERNEL_MISSING") return { id: "agent", status: "warn", summary: "not checked: the guest kernel is missing (setup builds both)", fix: a.error.hint };
    return { id: "agent", status: "fail", summary: a.error.message, detail: a.error.code, fix: a.error.hint };
  }
  const k = a.artifacts;
  const custom = k.agentKey.startsWith("custom:");
  const where = custom ? ", from SUPERMACHINE_INITRAMFS" : `${k.agentSource === "prebuilt" ? ", prebuilt package" : ""}, key ${k.agentKey}`;
  const v = agentOutput === null ? null : agentVersionOf(agentOutput);
  if (!v) return { id: "agent", status: "pass", summary: `guest agent ${k.agentVersion}${where} (protocol not checked: no agent binary next to the initramfs)`, detail: k.initramfs };
  if (v.protocol !== hostProtocol) {
    return {
      id: "agent",
      status: "fail",
      summary: `guest agent ${v.version} speaks protocol ${v.protocol}, this supermachine speaks ${hostProtocol}`,
      detail: k.initramfs,
      fix: custom ? "rebuild the initramfs given in SUPERMACHINE_INITRAMFS from this version's native/agent, or unset it" : "run supermachine's setup again (it rebuilds the agent for this version)",
    };
  }
  return { id: "agent", status: "pass", summary: `guest agent ${v.version}, protocol ${v.protocol}${where}`, detail: k.initramfs };
}

// ---- cache directory -----------------------------------------------------------------------------

export interface CacheFacts {
  home: string;
  /** stat of the home, or null when it does not exist. */
  stat: { uid: number; mode: number; isDirectory: boolean } | null;
  uid: number;
  /** When it does not exist: the nearest existing parent and whether this process may create entries in it. */
  parent?: { path: string; writable: boolean };
}

export function checkCache(f: CacheFacts): Check {
  const id = "cache";
  const elsewhere = "or set SUPERMACHINE_HOME to a directory of your own";
  if (!f.stat) {
    if (f.parent?.writable) return { id, status: "pass", summary: `${f.home} does not exist yet: it is created private (0700) on first use` };
    return { id, status: "fail", summary: `${f.home} does not exist and cannot be created: ${f.parent?.path ?? "its parent"} is not writable`, fix: `mkdir -m 700 -p ${f.home} as its future owner, ${elsewhere}` };
  }
  if (!f.stat.isDirectory) return { id, status: "fail", summary: `${f.home} is not a directory`, fix: `move it away, ${elsewhere}` };
  if (f.stat.uid !== f.uid) {
    return { id, status: "fail", summary: `${f.home} belongs to uid ${f.stat.uid}, not to this user (uid ${f.uid})`, detail: "another user's cache can hand this one images and snapshots it did not make", fix: `sudo chown -R ${f.uid} ${f.home}, ${elsewhere}` };
  }
  if ((f.stat.mode & 0o077) !== 0) {
    return {
      id,
      status: "warn",
      summary: `${f.home} is ${octal(f.stat.mode)}: other users can look into it`,
      detail: "supermachine tightens it (directories 0700, files 0600) the next time it uses it",
      fix: `chmod -R go-rwx ${f.home}`,
    };
  }
  return { id, status: "pass", summary: `${f.home} is yours and private (${octal(f.stat.mode)})` };
}

export function checkDiskSpace(f: { path: string; freeBytes: number | null; error?: string }): Check {
  const id = "disk";
  if (f.freeBytes === null) return { id, status: "warn", summary: `cannot tell the free space under ${f.path}`, detail: f.error };
  const free = `${gib(f.freeBytes)} free under ${f.path}`;
  const fix = "free space there (supermachine gc removes snapshots and images no project uses), or set SUPERMACHINE_HOME to a larger file system";
  if (f.freeBytes < LOW_SPACE_FAIL) return { id, status: "fail", summary: `${free}: too little to write a snapshot`, fix };
  if (f.freeBytes < LOW_SPACE_WARN) return { id, status: "warn", summary: `${free}: under ${gib(LOW_SPACE_WARN)}, images and snapshots may not fit`, fix };
  return { id, status: "pass", summary: free };
}

// ---- QEMU's sandbox ------------------------------------------------------------------------------

export function checkSandbox(c: ConfinementReport): Check {
  const id = "sandbox";
  const who = `${c.qemuUser.name}${c.qemuUser.uid !== null ? ` (uid ${c.qemuUser.uid})` : ""}`;
  if (c.sandbox === "off") {
    return { id, status: "warn", summary: `off: ${c.sandboxReason}; QEMU runs as ${who} without its seccomp sandbox`, fix: "unset SUPERMACHINE_UNSANDBOXED (guests run untrusted code: QEMU should be confined)" };
  }
  const hint = "or set SUPERMACHINE_UNSANDBOXED=1 to run VMs without it";
  if (c.sandbox === "unavailable") {
    return { id, status: "fail", summary: `unavailable: QEMU refuses -sandbox: ${c.sandboxReason}`, fix: `use a QEMU built with seccomp support (Debian's qemu-system-x86 is) on a kernel with seccomp filters, ${hint}` };
  }
  if (c.sandboxReason) return { id, status: "fail", summary: `QEMU's sandbox could not be checked: ${c.sandboxReason}`, fix: "fix the qemu check first" };
  if (c.error) {
    return { id, status: "fail", summary: `VMs cannot start: ${c.error}`, fix: `run supermachine's setup as root (it creates the user), or: useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ${c.qemuUser.name}` };
  }
  const user = c.qemuUser.dropped ? `QEMU runs as ${who}, unprivileged` : `QEMU runs as ${who}, this process's user`;
  return { id, status: "pass", summary: `on (seccomp), ${user}`, detail: `-sandbox ${c.sandboxOptions}` };
}

// ---- host identity -------------------------------------------------------------------------------

/**
 * What a snapshot made here records of the host (src/engine/identity.ts), and so where it can be
 * restored: hosts of the same QEMU build, machine type, accelerator and CPU model (and, with
 * `-cpu host`, the same CPU flags). Fails when SUPERMACHINE_CPU (or SUPERMACHINE_ACCEL) is not usable.
 */
export function checkIdentity(f: { identity: HostIdentity } | { error: string; hint?: string | undefined }): Check {
  const id = "identity";
  if ("error" in f) return { id, status: "fail", summary: `this host's identity cannot be read: ${f.error}`, ...(f.hint ? { fix: f.hint } : {}) };
  const h = f.identity;
  const summary = `snapshots made here restore on hosts with ${h.qemu}, machine ${h.machine}, accel ${h.accel}, -cpu ${h.cpu}`;
  if (h.cpuFlags) {
    return {
      id,
      status: "pass",
      summary: `${summary} and this CPU's ${h.cpuFlags.length} flags`,
      detail: `cpu flags: ${h.cpuFlags.join(" ")}\n-cpu ${h.cpu} passes this host's CPU through: its snapshots move only to hosts with exactly these flags (a homogeneous fleet); unset SUPERMACHINE_CPU for the baseline model, whose snapshots move across mixed hosts`,
    };
  }
  return { id, status: "pass", summary, detail: h.accel === "kvm" ? "a named CPU model with enforce: a host that lacks one of its features refuses to start it" : "TCG: the guest CPU is defined by the QEMU build and the model alone" };
}
