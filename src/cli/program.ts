/**
 * The `supermachine` command tree. Each command group lives in its own module and exports
 * `registerXxx(program: Command): void`, which adds its commands with `program.command(name)`
 * (so they inherit the settings below: exit override, error output, help layout) and gives each
 * an action wrapped in `action()` (common.ts). To add a group, call its register function in
 * `createProgram`.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Command } from "commander";
import { packageRoot } from "../engine/artifacts.js";
import { registerCacheCommands } from "./cache.js";
import { registerImageCommands } from "./images.js";
import { registerInfoCommand } from "./info.js";
import { registerDoctorCommand } from "./doctor.js";
import { registerInitCommand } from "./init.js";
import { registerProjectCommands } from "./project.js";
import { registerWatchCommand } from "./watch.js";
import { registerRunCommand } from "./run.js";
import { registerSetupCommand } from "./setup.js";
import { registerVerifyCommand } from "./verify.js";

const FOOTER = `
References: alpine:3.20, ghcr.io/owner/image@sha256:..., oci:<dir>[:<tag>],
            docker-archive:<file.tar>[:<name:tag>], builtin:busybox
Environment: SUPERMACHINE_HOME (cache dir), SUPERMACHINE_ACCEL=kvm|tcg, DEBUG=supermachine:*
Exit status: a command's own (run), 1 on errors, 2 on usage errors.`;

export function createProgram(): Command {
  const program = new Command("supermachine")
    .description("Run OCI/Docker images as isolated QEMU microVMs.")
    .version(version(), "-V, --version", "print the version")
    // Global, so every command accepts it, before or after the command name.
    .option("--json", "machine-readable output on stdout (errors as { error: { code, message, hint } })")
    .helpOption("-h, --help", "show help")
    .helpCommand("help [command]", "show help for a command")
    .configureHelp({ showGlobalOptions: true })
    // Usage errors: one line on stderr, then a pointer to the help; main.ts exits with 2.
    .configureOutput({ outputError: (str, write) => write(`supermachine: ${str.replace(/^error: /, "")}`) })
    .showHelpAfterError("(add --help for usage)")
    .exitOverride()
    .addHelpText("after", FOOTER);
  // Settings above are copied into each subcommand when it is created: register groups after them.
  registerRunCommand(program);
  registerImageCommands(program);
  registerInfoCommand(program);
  registerDoctorCommand(program);
  registerProjectCommands(program);
  registerWatchCommand(program);
  registerInitCommand(program);
  registerCacheCommands(program);
  registerVerifyCommand(program);
  registerSetupCommand(program);
  return program;
}

function version(): string {
  try {
    return (JSON.parse(readFileSync(join(packageRoot(), "package.json"), "utf8")) as { version: string }).version;
  } catch {
    return "unknown";
  }
}
