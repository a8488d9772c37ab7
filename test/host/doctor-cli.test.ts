// `supermachine doctor` run as a user would (built JS from dist/), judged against this host's
// facts read independently here.
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";

const root = join(import.meta.dirname, "..", "..");
const cli = (args: string[], env: NodeJS.ProcessEnv = {}) =>
  spawnSync(process.execPath, [join(root, "dist/src/cli/main.js"), ...args], { encoding: "utf8", timeout: 60_000, env: { ...process.env, ...env } });

interface Check {
  id: string;
  status: "pass" | "warn" | "fail";
  summary: string;
  detail?: string;
  fix?: string;
}
const byId = (checks: Check[]) => Object.fromEntries(checks.map((c) => [c.id, c]));

const tmp = mkdtempSync(join(tmpdir(), "sm-doctor-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe("supermachine doctor", () => {
  it("explains this host: the accelerator and why, the sandbox, the artifacts; ok and exit 0", () => {
    const env = { SUPERMACHINE_ACCEL: "", SUPERMACHINE_UNSANDBOXED: "" };
    const r = cli(["doctor", "--json"], env);
    expect(r.stderr).toBe("");
    const report = JSON.parse(r.stdout) as { checks: Check[]; ok: boolean };
    expect(report.checks.map((c) => c.id)).toEqual(["node", "qemu", "accel", "kvm-group", "kernel", "agent", "cache", "disk", "sandbox"]);
    for (const c of report.checks) {
      expect(["pass", "warn", "fail"]).toContain(c.status);
      if (c.status !== "pass") expect(c.fix, c.id).toBeTruthy();
    }
    const c = byId(report.checks);
    expect(report.ok).toBe(true);
    expect(r.status).toBe(0);

    // The accelerator, from the host's own facts.
    const flags = /^flags\s*:(.*)$/m.exec(readFileSync("/proc/cpuinfo", "utf8"))?.[1] ?? "";
    const hw = /\b(vmx|svm)\b/.test(flags);
    if (!hw) {
      expect(c.accel!.summary).toMatch(/^tcg: CPU has no vmx\/svm flag/);
      expect(c.accel!.status).toBe("warn");
      expect(c.accel!.detail).toContain("no vmx/svm");
      if (existsSync("/sys/module/kvm_pvm")) {
        expect(c.accel!.summary).toContain("kvm_pvm");
        expect(c.accel!.detail).toContain("kvm_pvm module: loaded");
        expect(c.accel!.detail).toContain("PVM");
      }
      expect(c["kvm-group"]!.summary).toContain("not needed");
    } else {
      expect(c.accel!.summary).toMatch(/^(kvm|tcg): /);
    }

    expect(c.sandbox).toMatchObject({ status: "pass", summary: expect.stringMatching(/^on \(seccomp\)/) });
    if (process.getuid?.() === 0) expect(c.sandbox!.summary).toContain("unprivileged");
    expect(c.kernel).toMatchObject({ status: "pass", summary: expect.stringMatching(/^guest kernel Linux \d+\.\d+\.\d+/), detail: expect.stringMatching(/vmlinux$/) });
    expect(c.agent).toMatchObject({ status: "pass", summary: expect.stringMatching(/^guest agent \S+, protocol \d+/) });
    expect(c.qemu).toMatchObject({ status: "pass", summary: expect.stringMatching(/^QEMU \d+\.\d+/) });
    expect(c.node!.summary).toContain(process.versions.node);
  });

  it("fails with exit 1 when QEMU is missing, names it with a fix, and creates nothing in a fresh cache", () => {
    const home = join(tmp, "home");
    const r = cli(["doctor"], { SUPERMACHINE_QEMU: join(tmp, "no-qemu"), SUPERMACHINE_HOME: home });
    expect(r.status).toBe(1);
    expect(r.stdout).toMatch(/^fail\s+qemu\s+QEMU cannot be run: .*no-qemu$/m);
    expect(r.stdout).toMatch(/fix: sudo apt-get install qemu-system-x86/);
    expect(r.stdout).toMatch(/^pass\s+cache\s+.*does not exist yet/m);
    expect(r.stdout).toMatch(/^2 checks failed$/m);
    expect(existsSync(home)).toBe(false);
  });
});
