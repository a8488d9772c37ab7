/**
 * `supermachine setup [--check]`: installs what the runtime needs and builds the guest artifacts
 * (kernel, agent, the busybox image) into the cache directory: src/setup/, which `npm run setup`
 * also runs in the repository after its bootstrap (npm ci, tsc; an installed package ships dist/).
 */
import type { Command } from "commander";
import { packageRoot } from "../engine/artifacts.js";
import { runSetup } from "../setup/index.js";
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
  return runSetup(packageRoot(), { artifactsOnly: true, check: o.check === true, skipApt: o.skipApt === true, quiet: o.quiet === true, json: isJson(cmd) });
}
