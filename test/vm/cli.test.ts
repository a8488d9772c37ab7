// The `supermachine` command, run as a user would (built JS from dist/, set up by npm test).
import { describe, expect, it } from "vitest";
import { cli as runCli } from "../helpers/run.js";

const cli = (...args: string[]) => runCli(args, { timeout: 60_000 });

describe("supermachine CLI", () => {
  it("runs a command in a VM and reports JSON", async () => {
    const r = await cli("run", "--json", "-e", "WHO=cli", "builtin:busybox", "--", "sh", "-c", 'echo "hi $WHO"');
    expect(r.status).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out).toMatchObject({ exitCode: 0, stdout: "hi cli\n", stderr: "", accel: expect.stringMatching(/^(kvm|tcg)$/) });
    expect(out.imageDigest).toMatch(/^sha256:[0-9a-f]{64}$/);
  });

  it("exits with the command's exit code and passes its output through", async () => {
    const r = await cli("run", "builtin:busybox", "--", "sh", "-c", "echo out; echo err >&2; exit 7");
    expect(r.status).toBe(7);
    expect(r.stdout).toBe("out\n");
    expect(r.stderr).toBe("err\n");
  });

  it("reports errors with their code in JSON and a usage error with status 2", async () => {
    const bad = await cli("run", "--json", "oci:/nonexistent", "--", "true");
    expect(bad.status).toBe(1);
    expect(JSON.parse(bad.stdout).error).toMatchObject({ code: "IMAGE_LAYOUT_NOT_FOUND" });
    const usage = await cli("frobnicate");
    expect(usage.status).toBe(2);
    expect(usage.stderr).toContain("unknown command");
  });

  it("refuses a relative or unnormalised --workdir before resolving the image or booting anything", async () => {
    // The image does not exist: the workdir is checked first, so nothing is resolved or started.
    for (const bad of ["tmp", "/tmp/../etc", "/tmp/"]) {
      const r = await cli("run", "-w", bad, "oci:/nonexistent", "--", "pwd");
      expect(r.status).toBe(2);
      expect(r.stderr).toContain(`got ${JSON.stringify(bad)}`);
      expect(r.stderr).toContain("absolute, normalised guest directory");
    }
    const ok = await cli("run", "-w", "/tmp", "builtin:busybox", "--", "pwd");
    expect(ok.status).toBe(0);
    expect(ok.stdout).toBe("/tmp\n");
  });

  it("passes everything after -- to the guest untouched, flags included", async () => {
    const r = await cli("run", "builtin:busybox", "--", "sh", "-c", 'printf "%s\\n" "$@"', "sh", "--json", "-e", "--help", "--", "-V");
    expect(r.status).toBe(0);
    expect(r.stdout).toBe("--json\n-e\n--help\n--\n-V\n");
  });

  it("has per-command help, a version, and rejects unknown options with status 2", async () => {
    const help = await cli("run", "--help");
    expect(help.status).toBe(0);
    expect(help.stdout).toMatch(/^Usage: supermachine run \[options\] <image> <argv\.\.\.>/);
    expect(help.stdout).toContain("--pull-policy");
    expect((await cli("help", "rmi")).stdout).toContain("Usage: supermachine rmi");
    expect((await cli("--help")).stdout).toMatch(/run \[options\] <image> <argv\.\.\.>[\s\S]*images[\s\S]*info[\s\S]*build[\s\S]*why/);
    expect((await cli("--version")).stdout).toMatch(/^\d+\.\d+\.\d+/);
    for (const args of [["images", "--frob"], ["run", "--memory", "lots", "builtin:busybox", "--", "true"], ["pull", "a", "b"], []]) {
      const r = await cli(...args);
      expect(r.status, args.join(" ")).toBe(2);
      expect(r.stdout).toBe("");
      expect(r.stderr).toMatch(/^(supermachine: |Usage: )/);
    }
    expect((await cli("images", "--frob")).stderr).toContain("unknown option '--frob'");
    // --json is global: accepted before the command name as well as after it.
    expect(JSON.parse((await cli("--json", "images")).stdout)).toBeInstanceOf(Array);
  });

  it("tags an image under a registry-style name that run then finds locally", async () => {
    const name = "localhost/sm-cli-test:latest";
    try {
      const tagged = await cli("tag", "--json", "builtin:busybox", "localhost/sm-cli-test");
      expect(tagged.status, tagged.stderr).toBe(0);
      expect(JSON.parse(tagged.stdout)).toEqual({ source: "builtin:busybox", target: name, manifestDigest: expect.stringMatching(/^sha256:[0-9a-f]{64}$/) });
      const listed = JSON.parse((await cli("images", "--json")).stdout) as { ref: string; source: string }[];
      expect(listed.find((i) => i.ref === name)).toMatchObject({ source: "tag" });

      const r = await cli("run", "--pull-policy", "never", name, "--", "echo", "hi");
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toBe("hi\n");

      const bad = await cli("tag", "--json", "builtin:busybox", "oci:./somewhere");
      expect(bad.status).toBe(1);
      expect(JSON.parse(bad.stdout).error).toMatchObject({ code: "REF_TAG_TARGET_INVALID", hint: expect.any(String) });
    } finally {
      const rmi = await cli("rmi", "--json", name);
      expect(rmi.status, rmi.stderr).toBe(0);
      expect(JSON.parse(rmi.stdout)).toMatchObject({ ref: name, removed: [name] });
    }
    expect((await cli("run", "--pull-policy", "never", name, "--", "true")).status).toBe(1);
  });

  it("explains its accelerator choice", async () => {
    const r = await cli("info", "--json");
    expect(r.status).toBe(0);
    const info = JSON.parse(r.stdout);
    expect(info.accel).toMatch(/^(kvm|tcg)$/);
    expect(info.accelReason).toBeTruthy();
    expect(info.artifacts.kernel).toMatch(/vmlinux$/);
  });
});
