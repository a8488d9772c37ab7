// The checks of `supermachine doctor`, judged on made-up host facts (no engine, no mocks).
import { describe, expect, it } from "vitest";
import { cpuFlagsOf, decideAccel, type HostAccelFacts } from "../../src/engine/accel.js";
import type { ConfinementReport } from "../../src/engine/confine.js";
import {
  agentVersionOf,
  checkAccel,
  checkAgent,
  checkCache,
  checkDiskSpace,
  checkKernel,
  checkKvmGroup,
  checkRuntime,
  checkQemu,
  checkSandbox,
  kernelVersionOf,
  type KvmGroupFacts,
} from "../../src/doctor/checks.js";

const CPUINFO_PVM = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse tsc msr pae hypervisor lahf_lm abm\nbugs\t\t: spectre_v1\n";
const CPUINFO_VMX = "processor\t: 0\nflags\t\t: fpu vme vmx ept pae\n";
const host = (over: Partial<HostAccelFacts>): HostAccelFacts => ({ cpuFlags: cpuFlagsOf(CPUINFO_VMX), kvmDevice: true, kvmReadWrite: true, pvmModule: false, qemuUser: null, ...over });

describe("doctor: runtime", () => {
  const node = (version: string) => ({ runtime: { name: "node" as const, version, nodeApi: version }, engines: ">=20" });
  it("passes a Node inside the engines range and fails one outside it, naming both", () => {
    expect(checkRuntime(node("20.20.2"))).toMatchObject({ id: "runtime", status: "pass" });
    const old = checkRuntime(node("18.19.0"));
    expect(old).toMatchObject({ status: "fail", summary: expect.stringContaining("18.19.0") });
    expect(old.summary).toContain(">=20");
    expect(old.fix).toContain(">=20");
  });

  it("judges Bun and Deno by their own version, not the Node API they report", () => {
    const bun = checkRuntime({ runtime: { name: "bun", version: "1.4.5", nodeApi: "26.3.0" }, engines: ">=20" });
    expect(bun).toMatchObject({ status: "pass", summary: "Bun 1.4.5 (Node API 26.3.0), supported from Bun 1.2.0" });
    const deno = checkRuntime({ runtime: { name: "deno", version: "2.6.0", nodeApi: "24.2.0" }, engines: ">=20" });
    expect(deno).toMatchObject({ status: "fail", summary: expect.stringMatching(/^Deno 2\.6\.0 \(Node API 24\.2\.0\): supermachine needs Deno 2\.7\.14 or later/) });
    expect(deno.fix).toContain("deno upgrade");
  });
});

describe("doctor: qemu", () => {
  const machines = "Supported machines are:\nmicrovm              microvm (i386)\npc                   Standard PC\n";
  it("passes QEMU 7.2 with microvm, warns on an older one, fails a missing binary or one without microvm", () => {
    expect(checkQemu({ binary: "q", versionOutput: "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)\n", machines })).toMatchObject({ status: "pass", summary: expect.stringContaining("7.2.22") });
    expect(checkQemu({ binary: "q", versionOutput: "QEMU emulator version 6.2.0\n", machines }).status).toBe("warn");
    const missing = checkQemu({ binary: "/opt/nope/qemu", versionOutput: null, error: "spawnSync /opt/nope/qemu ENOENT", machines: null });
    expect(missing).toMatchObject({ status: "fail", summary: expect.stringContaining("/opt/nope/qemu"), fix: expect.stringContaining("apt-get install qemu-system-x86") });
    expect(checkQemu({ binary: "q", versionOutput: "QEMU emulator version 8.0.0\n", machines: "pc  Standard PC\n" })).toMatchObject({ status: "fail", summary: expect.stringContaining("microvm") });
  });
});

describe("doctor: accelerator (the engine's own decision, explained)", () => {
  it("explains TCG on a PVM host: no vmx/svm while kvm_pvm provides a /dev/kvm that opens", () => {
    const f = host({ cpuFlags: cpuFlagsOf(CPUINFO_PVM), pvmModule: true });
    expect(decideAccel(f).accel).toBe("tcg");
    const c = checkAccel(f, undefined);
    expect(c.status).toBe("warn");
    expect(c.summary).toBe("tcg: CPU has no vmx/svm flag (the kvm_pvm module provides /dev/kvm without it)");
    expect(c.detail).toContain("/dev/kvm: present, read-write for this process");
    expect(c.detail).toContain("PVM");
    expect(c.fix).toContain("nested virtualization");
  });

  it("passes KVM with vmx and a usable /dev/kvm; warns when kvm_pvm is loaded beside vmx", () => {
    expect(checkAccel(host({}), undefined)).toMatchObject({ status: "pass", summary: "kvm: hardware virtualization available" });
    expect(checkAccel(host({ pvmModule: true }), undefined)).toMatchObject({ status: "warn", fix: expect.stringContaining("SUPERMACHINE_ACCEL=tcg") });
  });

  it("names the cause and the fix when vmx is there but KVM is not usable", () => {
    expect(checkAccel(host({ kvmDevice: false, kvmReadWrite: false }), undefined)).toMatchObject({ status: "warn", summary: "tcg: no /dev/kvm", fix: expect.stringContaining("modprobe kvm_intel") });
    expect(checkAccel(host({ kvmReadWrite: false }), undefined)).toMatchObject({ status: "warn", fix: expect.stringContaining("kvm-group") });
    const qemuUser = checkAccel(host({ qemuUser: { name: "supermachine", kvmReadWrite: false } }), undefined);
    expect(qemuUser).toMatchObject({ status: "warn", summary: expect.stringContaining("supermachine, the user QEMU runs as") });
    expect(qemuUser.fix).toContain("chmod 660 /dev/kvm");
  });

  it("reports a forced accelerator against the host's choice, and fails an invalid one", () => {
    const pvm = host({ cpuFlags: cpuFlagsOf(CPUINFO_PVM), pvmModule: true });
    expect(checkAccel(pvm, "tcg").status).toBe("pass");
    expect(checkAccel(pvm, "kvm")).toMatchObject({ status: "warn", summary: expect.stringContaining("host calls for tcg"), fix: expect.stringContaining("unset SUPERMACHINE_ACCEL") });
    expect(checkAccel(pvm, "hvf")).toMatchObject({ status: "fail", summary: expect.stringContaining('"hvf"') });
  });
});

describe("doctor: /dev/kvm group", () => {
  const user = (over: Partial<KvmGroupFacts>): KvmGroupFacts => ({
    uid: 1000,
    userName: "ada",
    groups: [1000],
    device: { uid: 0, gid: 993, mode: 0o20660 },
    group: { name: "kvm", members: [] },
    hardwareVirt: true,
    readWrite: false,
    ...over,
  });
  it("passes a member of the kvm group, and is not needed without vmx/svm, without /dev/kvm, or as root", () => {
    expect(checkKvmGroup(user({ groups: [1000, 993], readWrite: true }))).toMatchObject({ status: "pass", summary: "ada opens /dev/kvm read-write through group kvm" });
    expect(checkKvmGroup(user({ hardwareVirt: false })).summary).toContain("not needed");
    expect(checkKvmGroup(user({ device: null })).summary).toContain("no /dev/kvm");
    expect(checkKvmGroup(user({ uid: 0 })).summary).toContain("root");
  });
  it("tells a non-member to join the group, and a fresh member to log in again", () => {
    expect(checkKvmGroup(user({}))).toMatchObject({ status: "warn", fix: "sudo usermod -aG kvm ada, then log out and back in" });
    expect(checkKvmGroup(user({ group: { name: "kvm", members: ["bob", "ada"] } }))).toMatchObject({ status: "warn", fix: expect.stringContaining("newgrp kvm") });
  });
  it("says when no group may open the device (0600)", () => {
    const c = checkKvmGroup(user({ device: { uid: 0, gid: 0, mode: 0o20600 }, group: { name: "root", members: [] } }));
    expect(c).toMatchObject({ status: "warn", summary: expect.stringContaining("0600") });
    expect(c.fix).toContain("chmod 660 /dev/kvm");
  });
});

describe("doctor: kernel and agent", () => {
  const artifacts = { kernel: "/c/kernel/k1/vmlinux", initramfs: "/c/agent/a1/initramfs.cpio", kernelKey: "k1", agentKey: "a1", agentVersion: "0.1.0", kernelSource: "cache" as const, agentSource: "cache" as const };
  it("reads the kernel's version from its banner and the agent's from --version", () => {
    const image = Buffer.concat([Buffer.alloc(4096, 0x7f), Buffer.from("Linux version 6.1.192 (root@build) (gcc 12.2.0) #1 SMP\0"), Buffer.alloc(100)]);
    expect(kernelVersionOf(image)).toBe("6.1.192");
    expect(kernelVersionOf(Buffer.alloc(1000))).toBeNull();
    expect(agentVersionOf("supermachine-agent 0.1.0 (protocol 3)\n")).toEqual({ version: "0.1.0", protocol: 3 });
    expect(checkKernel({ artifacts }, "6.1.192")).toMatchObject({ status: "pass", summary: "guest kernel Linux 6.1.192, key k1" });
    expect(checkAgent({ artifacts }, "supermachine-agent 0.1.0 (protocol 3)\n", 3)).toMatchObject({ status: "pass", summary: "guest agent 0.1.0, protocol 3, key a1" });
  });
  it("fails an agent of another protocol, and missing artifacts with the setup error's hint", () => {
    expect(checkAgent({ artifacts }, "supermachine-agent 0.0.9 (protocol 2)\n", 3)).toMatchObject({ status: "fail", summary: expect.stringContaining("protocol 2") });
    const error = { code: "SETUP_KERNEL_MISSING", message: "no guest kernel has been built", hint: "run setup" };
    expect(checkKernel({ error }, null)).toMatchObject({ status: "fail", summary: error.message, fix: "run setup" });
    expect(checkAgent({ error }, null, 3).status).toBe("warn");
    const agentError = { code: "SETUP_AGENT_MISSING", message: "guest agent initramfs not found at /x", hint: "run setup" };
    expect(checkAgent({ error: agentError }, null, 3)).toMatchObject({ status: "fail", fix: "run setup" });
  });
});

describe("doctor: cache directory and space", () => {
  const dir = (mode: number, uid = 1000) => ({ home: "/h/.cache/supermachine", uid: 1000, stat: { uid, mode: 0o40000 | mode, isDirectory: true } });
  it("passes a private home of this user, warns an open one, fails another user's", () => {
    expect(checkCache(dir(0o700)).status).toBe("pass");
    expect(checkCache(dir(0o755))).toMatchObject({ status: "warn", summary: expect.stringContaining("0755"), fix: "chmod -R go-rwx /h/.cache/supermachine" });
    expect(checkCache(dir(0o700, 0))).toMatchObject({ status: "fail", summary: expect.stringContaining("uid 0") });
  });
  it("judges a home that does not exist yet by its parent", () => {
    expect(checkCache({ home: "/h/x", uid: 1000, stat: null, parent: { path: "/h", writable: true } }).status).toBe("pass");
    expect(checkCache({ home: "/h/x", uid: 1000, stat: null, parent: { path: "/h", writable: false } }).status).toBe("fail");
  });
  it("warns under 2 GiB free and fails under 256 MiB", () => {
    expect(checkDiskSpace({ path: "/h", freeBytes: 50 * 1024 ** 3 }).status).toBe("pass");
    expect(checkDiskSpace({ path: "/h", freeBytes: 1.5 * 1024 ** 3 })).toMatchObject({ status: "warn", summary: expect.stringContaining("1.5 GiB") });
    expect(checkDiskSpace({ path: "/h", freeBytes: 100 * 1024 ** 2 }).status).toBe("fail");
  });
});

describe("doctor: QEMU's sandbox", () => {
  const report = (over: Partial<ConfinementReport>): ConfinementReport => ({
    sandbox: "on",
    sandboxOptions: "on,obsolete=deny",
    sandboxReason: null,
    unsandboxed: false,
    qemuUser: { name: "supermachine", uid: 999, dropped: true },
    error: null,
    ...over,
  });
  it("passes the sandbox on with an unprivileged user; warns when off; fails when unavailable or the user is missing", () => {
    expect(checkSandbox(report({}))).toMatchObject({ status: "pass", summary: "on (seccomp), QEMU runs as supermachine (uid 999), unprivileged" });
    expect(checkSandbox(report({ sandbox: "off", sandboxReason: "SUPERMACHINE_UNSANDBOXED=1", unsandboxed: true })).status).toBe("warn");
    expect(checkSandbox(report({ sandbox: "unavailable", sandboxReason: "seccomp not supported" }))).toMatchObject({ status: "fail", summary: expect.stringContaining("seccomp not supported") });
    expect(checkSandbox(report({ qemuUser: { name: "supermachine", uid: null, dropped: true }, error: "the QEMU user supermachine does not exist" }))).toMatchObject({ status: "fail", fix: expect.stringContaining("useradd") });
  });
});
