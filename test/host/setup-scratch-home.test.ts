// A scratch SUPERMACHINE_HOME finds the guest through the home setup used, whatever that home
// is: setup run with SUPERMACHINE_HOME=A (not the default home) records A in the default home,
// and a process with another, empty home B then finds A's kernel and agent. The default home is
// made a fresh directory (XDG_CACHE_HOME), so nothing on this machine answers for A. No kernel is
// built: A gets the kernel and agent this process uses, copied under the keys setup computes.
import { execFile } from "node:child_process";
import { cpSync, existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import { promisify } from "node:util";
import { afterAll, describe, expect, it } from "vitest";
import { nativeArtifacts } from "../../src/engine/artifacts.js";

const root = join(import.meta.dirname, "..", "..");
const run = promisify(execFile);
const work = mkdtempSync(join(tmpdir(), "sm-scratch-home-"));
afterAll(() => rmSync(work, { recursive: true, force: true }));

const here = nativeArtifacts();
// With the guest from the prebuilt package or explicit paths, every home finds it without a manifest: nothing to prove then.
const fromCache = here.kernelSource === "cache" && here.agentSource === "cache";

describe.runIf(fromCache)("a scratch SUPERMACHINE_HOME", () => {
  it("finds the guest through the non-default home setup ran in", async () => {
    const xdg = join(work, "xdg"); // the default home: <xdg>/supermachine, empty
    const a = join(work, "a");
    const b = join(work, "b");
    for (const [kind, file] of [["kernel", here.kernel], ["agent", here.initramfs]] as const) cpSync(dirname(file), join(a, kind, basename(dirname(file))), { recursive: true });
    const env: NodeJS.ProcessEnv = { ...process.env, XDG_CACHE_HOME: xdg, SUPERMACHINE_NO_PREBUILT: "1" };
    delete env.SUPERMACHINE_KERNEL;
    delete env.SUPERMACHINE_INITRAMFS;

    const setup = await run(process.execPath, [join(root, "scripts/setup.mjs"), "--artifacts-only", "--skip-apt", "--json"], { cwd: root, env: { ...env, SUPERMACHINE_HOME: a }, timeout: 300_000 });
    const out = JSON.parse(setup.stdout) as { ok: boolean; home: string; built: string[] };
    expect(out).toMatchObject({ ok: true, home: a });
    expect(out.built).not.toContain("kernel");
    expect(out.built).not.toContain("agent");
    const homes = JSON.parse(readFileSync((await import("../../src/engine/artifacts.js")).installHomesPath(root, { ...env, SUPERMACHINE_HOME: join(xdg, "supermachine") }), "utf8")) as string[];
    expect(homes).toEqual([a]);

    const probe = `import { nativeArtifacts } from ${JSON.stringify(join(root, "dist/src/engine/artifacts.js"))}; console.log(JSON.stringify(nativeArtifacts()));`;
    const found = JSON.parse((await run(process.execPath, ["--input-type=module", "-e", probe], { env: { ...env, SUPERMACHINE_HOME: b } })).stdout) as { kernel: string; initramfs: string };
    expect(found.kernel.startsWith(join(a, "kernel") + "/")).toBe(true);
    expect(found.initramfs.startsWith(join(a, "agent") + "/")).toBe(true);
    expect(existsSync(join(b, "installs"))).toBe(false);

    const doctor = await run(process.execPath, [join(root, "dist/src/cli/main.js"), "doctor", "--json"], { env: { ...env, SUPERMACHINE_HOME: b } }).catch((e: { stdout: string }) => e);
    const checks = (JSON.parse(doctor.stdout) as { checks: { id: string; status: string; detail?: string }[] }).checks;
    for (const id of ["kernel", "agent"]) expect(checks.find((c) => c.id === id), id).toMatchObject({ status: "pass", detail: expect.stringMatching(new RegExp(`^${a}/`)) });
  }, 600_000);
});
