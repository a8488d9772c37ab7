/**
 * `supermachine setup [--check]`: installs what the runtime needs and builds the guest artifacts
 * (kernel, agent, the busybox image) into the cache directory. It runs the package's own
 * `scripts/setup.mjs --artifacts-only`, the same logic `npm run setup` runs in the repository,
 * without its repository-only steps (npm ci, tsc): an installed package ships dist/.
 */
import { spawn } from "node:child_process";
import { join } from "node:path";
import type { Command } from "commander";
import { packageRoot } from "../engine/artifacts.js";
import { action, isJson } from "./common.js";

export function registerSetupCommand(program: Command): void {
  program
    .command("setup")
    .helpGroup("Host:")
    .summary("install what is missing: Debian packages, guest kernel, agent, busybox image, QEMU's user")
    .description(
      "Install what supermachine needs on this host, only what is missing: the Debian packages (apt-get, " +
        "as root or through sudo -n), the guest kernel and agent (built into the cache directory under a " +
        "hash of their inputs; the kernel takes several minutes), the built-in busybox image, and, as root, " +
        "the unprivileged user QEMU runs as. Progress and an estimate go to stderr. A second run does nothing.",
    )
    .option("--check", "report what is missing without installing or building anything (exit status 1 when something is)")
    .option("--skip-apt", "do not install Debian packages")
    .option("-q, --quiet", "print only when something is done")
    .addHelpText("after", "\nExamples:\n  npx supermachine setup\n  npx supermachine setup --check --json")
    .action(action(setup));
}

async function setup(o: { check?: boolean; skipApt?: boolean; quiet?: boolean }, cmd: Command): Promise<number> {
  const argv = [join(packageRoot(), "scripts", "setup.mjs"), "--artifacts-only"];
  if (o.check) argv.push("--check");
  if (o.skipApt) argv.push("--skip-apt");
  if (o.quiet) argv.push("--quiet");
  if (isJson(cmd)) argv.push("--json");
  return await new Promise<number>((resolve, reject) => {
    const child = spawn(process.execPath, argv, { stdio: "inherit" });
    child.on("error", reject);
    child.on("exit", (code, signal) => resolve(code ?? (signal ? 128 + 1 : 1)));
  });
}
