// The CLI names a live lock holder while it waits: `supermachine pull` on an image whose store
// entry another process holds prints "waiting for <what>, held by pid N since ...", goes on
// waiting while the holder lives, and completes (a real bake) once it lets go. Runs dist: build first.
import { spawn } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { resolveImage } from "../../src/image/resolve.js";
import { homePaths } from "../../src/paths.js";
import { acquireLock } from "../../src/store/lock.js";
import { waitFor } from "../helpers/vm.js";

const root = join(import.meta.dirname, "..", "..");
const home = mkdtempSync(join(tmpdir(), "sm-lock-cli-"));
afterAll(() => rmSync(home, { recursive: true, force: true }));

describe("CLI lock wait", () => {
  it("shows who holds the lock while it waits, and goes on once the holder lets go", async () => {
    cpSync(homePaths().builtin, join(home, "builtin"), { recursive: true });
    const { manifestDigest } = await resolveImage("builtin:busybox"); // the shared home: same builtin, same digest
    mkdirSync(join(home, "images"), { recursive: true });
    const lock = await acquireLock(join(home, "images", `${manifestDigest.slice(7)}.lock`), { what: "a test holding the image" });
    const cli = spawn(process.execPath, [join(root, "dist/src/cli/main.js"), "pull", "builtin:busybox"], { env: { ...process.env, SUPERMACHINE_HOME: home }, stdio: ["ignore", "pipe", "pipe"] });
    let stderr = "";
    cli.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    const exit = new Promise<number | null>((r) => cli.once("exit", (code) => r(code)));
    try {
      const line = new RegExp(`waiting for image "builtin:busybox" \\(${manifestDigest}\\), held by pid ${process.pid} since \\d`);
      expect(await waitFor(() => line.test(stderr), 30_000), stderr).toBe(true);
      await new Promise((r) => setTimeout(r, 1_000));
      expect(cli.exitCode).toBeNull(); // a live holder is waited for
      expect(stderr).not.toContain("root filesystem ready");
    } finally {
      await lock.release();
    }
    const code = await Promise.race([exit, new Promise((r) => setTimeout(() => r("timeout"), 180_000))]);
    if (code === "timeout") cli.kill("SIGKILL");
    expect(code, stderr).toBe(0);
    expect(stderr).toContain("root filesystem ready");
  }, 240_000);
});
