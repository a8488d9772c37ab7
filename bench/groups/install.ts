/** Benchmark group `install`: installing like an npm package: the first hello, and setup with nothing to do. */
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { packageRoot } from "../../src/engine/artifacts.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const installGroup: BenchGroup = {
  name: "install",
  metrics: ["first_hello_s", "setup_noop_ms", "npx_setup_noop_ms", "npx_cli_version_ms"],
  run: (ctx) => installBenchmarks(ctx),
};

/**
 * Installing like an npm package (issue 11): `npm run pack:all`, a fresh project installs both
 * tarballs (the guest package carries the kernel and agent), then from an EMPTY cache directory
 * `npx supermachine setup` and a five-line hello program (first_hello_s: wall time of the two,
 * the install itself not counted), then `npx supermachine setup` with nothing to do.
 */
async function installBenchmarks(ctx: BenchContext): Promise<void> {
  const { quick, record, recordValue } = ctx;
  const root = packageRoot();
  const sh = (cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = process.env) =>
    execFileSync(cmd, args, { cwd, env, encoding: "utf8", timeout: 300_000, stdio: ["ignore", "pipe", "pipe"] });
  const tgz = JSON.parse(sh(process.execPath, [join(root, "scripts", "pack-all.mjs"), "--json"], root)) as { main: string; guest: string };
  const work = mkdtempSync(join(tmpdir(), "sm-bench-install-"));
  try {
    const project = join(work, "app");
    const home = join(work, "home");
    mkdirSync(project);
    mkdirSync(home);
    writeFileSync(join(project, "package.json"), JSON.stringify({ name: "app", private: true, type: "module" }));
    // The same first program the install tests run.
    copyFileSync(new URL("../../../test/fixtures/hello.mjs", import.meta.url), join(project, "hello.mjs"));
    sh("npm", ["install", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error", tgz.main, tgz.guest], project);
    const env: NodeJS.ProcessEnv = { ...process.env, SUPERMACHINE_HOME: home };
    for (const k of ["SUPERMACHINE_KERNEL", "SUPERMACHINE_INITRAMFS", "SUPERMACHINE_NO_PREBUILT"]) delete env[k];
    const t0 = performance.now();
    const setup = JSON.parse(sh("npx", ["--no-install", "supermachine", "setup", "--skip-apt", "--json"], project, env)) as { built: string[] };
    const out = sh(process.execPath, ["hello.mjs"], project, env);
    const s = (performance.now() - t0) / 1000;
    if (out !== "exit 0: hello\n") throw new Error(`hello printed ${JSON.stringify(out)}`);
    if (setup.built.includes("kernel") || setup.built.includes("agent")) throw new Error(`setup built ${setup.built.join(", ")}: the prebuilt package was not used`);
    recordValue("first_hello_s", s, 1, "s");
    // The command with nothing to do, as installed (what npx runs), and as typed through npx,
    // whose own start is measured beside it (npx_cli_version_ms: npx and the CLI doing nothing).
    const bin = join(project, "node_modules", ".bin", "supermachine");
    const timed = (cmd: string, args: string[]): number[] => {
      const out: number[] = [];
      for (let i = 0; i < (quick ? 3 : 10); i++) {
        const t = performance.now();
        sh(cmd, args, project, env);
        out.push(performance.now() - t);
      }
      return out;
    };
    record("setup_noop_ms", timed(bin, ["setup"]));
    record("npx_setup_noop_ms", timed("npx", ["--no-install", "supermachine", "setup"]));
    const bare = timed("npx", ["--no-install", "supermachine", "--version"]);
    record("npx_cli_version_ms", bare);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}
