// `supermachine doctor` run as a user would (built JS from dist/), judged against this host's
// facts read independently here: it must pass with or without /dev/kvm, with a /dev/kvm that is
// not hardware KVM (kvm_pvm), and with real KVM.
import { spawnSync } from "node:child_process";
import { accessSync, constants, existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { cli as runCli } from "../helpers/run.js";

const cli = (args: string[], env: NodeJS.ProcessEnv = {}) => runCli(args, { timeout: 60_000, env: { ...process.env, ...env } });

interface Check {
  id: string;
  status: "pass" | "warn" | "fail";
  summary: string;
  detail?: string;
  fix?: string;
}
const byId = (checks: Check[]) => Object.fromEntries(checks.map((c) => [c.id, c]));

/** What the accelerator choice rests on, read here without the engine's code. */
function hostFacts(): { hw: boolean; kvm: boolean; rw: boolean; pvm: boolean } {
  const flags = /^flags\s*:(.*)$/m.exec(readFileSync("/proc/cpuinfo", "utf8"))?.[1] ?? "";
  const kvm = existsSync("/dev/kvm");
  let rw = false;
  try {
    accessSync("/dev/kvm", constants.R_OK | constants.W_OK);
    rw = true;
  } catch {
    /* absent, or not for this user */
  }
  return { hw: /\b(vmx|svm)\b/.test(flags), kvm, rw, pvm: existsSync("/sys/module/kvm_pvm") };
}

const tmp = mkdtempSync(join(tmpdir(), "sm-doctor-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe("supermachine doctor", () => {
  it("explains this host: the accelerator and why, the sandbox, the artifacts; ok and exit 0", async () => {
    const env = { SUPERMACHINE_ACCEL: "", SUPERMACHINE_UNSANDBOXED: "", SUPERMACHINE_CPU: "" };
    const r = await cli(["doctor", "--json"], env);
    expect(r.stderr).toBe("");
    const report = JSON.parse(r.stdout) as { checks: Check[]; identity: Record<string, unknown> | null; ok: boolean };
    expect(report.checks.map((c) => c.id)).toEqual(["runtime", "qemu", "accel", "kvm-group", "kernel", "agent", "cache", "disk", "sandbox", "identity"]);
    for (const c of report.checks) {
      expect(["pass", "warn", "fail"]).toContain(c.status);
      if (c.status !== "pass") expect(c.fix, c.id).toBeTruthy();
    }
    const c = byId(report.checks);
    expect(report.ok).toBe(true);
    expect(r.status).toBe(0);

    // The accelerator, from the host's own facts, in the order the engine weighs them: no
    // /dev/kvm, then no vmx/svm (a /dev/kvm such as kvm_pvm's is not hardware KVM), then access.
    const host = hostFacts();
    const accel = c.accel!;
    expect(accel.detail).toMatch(host.hw ? /CPU flags: (vmx|svm) present/ : /CPU flags: no vmx\/svm/);
    expect(accel.detail).toContain(host.kvm ? `/dev/kvm: present, ${host.rw ? "" : "not "}read-write` : "/dev/kvm: absent");
    expect(accel.detail).toContain(`kvm_pvm module: ${host.pvm ? "loaded" : "not loaded"}`);
    if (!host.kvm) {
      expect(accel).toMatchObject({ status: "warn", summary: "tcg: no /dev/kvm" });
      expect(c["kvm-group"]!.summary).toBe("not needed: there is no /dev/kvm");
    } else if (!host.hw) {
      expect(accel.summary).toMatch(/^tcg: CPU has no vmx\/svm flag/);
      expect(accel.status).toBe("warn");
      if (host.pvm) {
        expect(accel.summary).toContain("kvm_pvm");
        expect(accel.detail).toContain("this /dev/kvm is PVM's");
      } else {
        expect(accel.detail).toContain("is not hardware KVM");
      }
      expect(c["kvm-group"]!.summary).toContain("not needed: the CPU has no vmx/svm");
    } else if (!host.rw) {
      expect(accel).toMatchObject({ status: "warn", summary: expect.stringMatching(/^tcg: \/dev\/kvm is not accessible read-write/) });
    } else {
      // Hardware KVM this process opens; as root, QEMU's own user must open it too.
      expect(accel.summary).toMatch(/^kvm: hardware virtualization available|^tcg: \/dev\/kvm is not accessible read-write to /);
    }

    expect(c.sandbox).toMatchObject({ status: "pass", summary: expect.stringMatching(/^on \(seccomp\)/) });
    if (process.getuid?.() === 0) expect(c.sandbox!.summary).toContain("unprivileged");
    expect(c.kernel).toMatchObject({ status: "pass", summary: expect.stringMatching(/^guest kernel Linux \d+\.\d+\.\d+/), detail: expect.stringMatching(/vmlinux$/) });
    expect(c.agent).toMatchObject({ status: "pass", summary: expect.stringMatching(/^guest agent \S+, protocol \d+/) });
    expect(c.qemu).toMatchObject({ status: "pass", summary: expect.stringMatching(/^QEMU \d+\.\d+/) });
    expect(c.runtime!.summary).toMatch(new RegExp(`^Node ${process.versions.node.replace(/\./g, "\\.")} satisfies engines `));

    // The host's identity, as snapshots record it: the QEMU's own version line, microvm, the
    // accelerator the accel check chose, and the CPU model that accelerator gets by default.
    const qemuLine = spawnSync(process.env.SUPERMACHINE_QEMU || "qemu-system-x86_64", ["--version"], { encoding: "utf8" }).stdout.split("\n")[0]!.trim();
    const accelNow = accel.summary.split(":")[0];
    expect(report.identity).toEqual({ qemu: qemuLine, machine: "microvm", accel: accelNow, cpu: accelNow === "kvm" ? "Nehalem-v1,enforce" : "max" });
    expect(c.identity).toMatchObject({ status: "pass", summary: `snapshots made here restore on hosts with ${qemuLine}, machine microvm, accel ${accelNow}, -cpu ${report.identity!.cpu}` });
  });

  it("shows the CPU model SUPERMACHINE_CPU gives, and the host's CPU flags only for -cpu host under KVM", async () => {
    const named = JSON.parse((await cli(["doctor", "--json"], { SUPERMACHINE_CPU: "qemu64" })).stdout) as { identity: Record<string, unknown> };
    expect(named.identity).toMatchObject({ cpu: "qemu64" });
    expect(named.identity.cpuFlags).toBeUndefined();
    const r = await cli(["doctor", "--json"], { SUPERMACHINE_CPU: "host" });
    const report = JSON.parse(r.stdout) as { checks: Check[]; identity: Record<string, unknown> | null };
    const c = byId(report.checks);
    if (c.accel!.summary.startsWith("kvm")) {
      const flags = [...new Set((/^flags\s*:(.*)$/m.exec(readFileSync("/proc/cpuinfo", "utf8"))?.[1] ?? "").split(/\s+/).filter(Boolean))].sort();
      expect(report.identity).toMatchObject({ accel: "kvm", cpu: "host", cpuFlags: flags });
      expect(c.identity!.detail).toContain("homogeneous fleet");
    } else {
      // -cpu host needs KVM: refused by name, with what to do.
      expect(report.identity).toBeNull();
      expect(c.identity).toMatchObject({ status: "fail", summary: expect.stringContaining("SUPERMACHINE_CPU=host needs KVM"), fix: expect.stringContaining("unset SUPERMACHINE_CPU") });
      expect(r.status).toBe(1);
    }
  });

  it("fails with exit 1 when QEMU is missing, names it with a fix, and creates nothing in a fresh cache", async () => {
    const home = join(tmp, "home");
    const r = await cli(["doctor"], { SUPERMACHINE_QEMU: join(tmp, "no-qemu"), SUPERMACHINE_HOME: home });
    expect(r.status).toBe(1);
    expect(r.stdout).toMatch(/^fail\s+qemu\s+QEMU cannot be run: .*no-qemu$/m);
    expect(r.stdout).toMatch(/fix: sudo apt-get install qemu-system-x86/);
    expect(r.stdout).toMatch(/^pass\s+cache\s+.*does not exist yet/m);
    expect(r.stdout).toMatch(/^2 checks failed$/m);
    expect(existsSync(home)).toBe(false);
  });
});
