/**
 * The `supermachine` command tree. Each command group lives in its own module and exports
 * `registerXxx(program: Command): void`, which adds its commands with `program.command(name)`
 * (so they inherit the settings below: exit override, error output, help layout) and gives each
 * an action wrapped in `action()` (common.ts). To add a group, list it in `COMMAND_GROUPS` with
 * the top-level names it registers (test/unit/cli-program.test.ts checks the table).
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Command } from "commander";
import { packageRoot } from "../engine/artifacts.js";

const FOOTER = `
References: alpine:3.20, ghcr.io/owner/image@sha256:..., oci:<dir>[:<tag>],
            docker-archive:<file.tar>[:<name:tag>], builtin:busybox
Environment: SUPERMACHINE_HOME (cache dir), SUPERMACHINE_ACCEL=kvm|tcg, DEBUG=supermachine:*
Exit status: a command's own (run), 1 on errors, 2 on usage errors.`;

type Register = (program: Command) => void;

/**
 * The command groups in the order help lists them, each with the top-level names it registers.
 * A module is imported only when needed: loading every command's dependencies costs about
 * 0.2 s, more than `setup` or `doctor` take with nothing to do.
 */
export const COMMAND_GROUPS: readonly { names: readonly string[]; load: () => Promise<Register> }[] = [
  { names: ["run"], load: async () => (await import("./run.js")).registerRunCommand },
  { names: ["pull", "tag", "images", "rmi", "gc"], load: async () => (await import("./images.js")).registerImageCommands },
  { names: ["info"], load: async () => (await import("./info.js")).registerInfoCommand },
  { names: ["doctor"], load: async () => (await import("./doctor.js")).registerDoctorCommand },
  { names: ["build", "ls", "why", "graph"], load: async () => (await import("./project.js")).registerProjectCommands },
  { names: ["watch"], load: async () => (await import("./watch.js")).registerWatchCommand },
  { names: ["init"], load: async () => (await import("./init.js")).registerInitCommand },
  { names: ["cache"], load: async () => (await import("./cache.js")).registerCacheCommands },
  { names: ["verify"], load: async () => (await import("./verify.js")).registerVerifyCommand },
  { names: ["setup"], load: async () => (await import("./setup.js")).registerSetupCommand },
  { names: ["serve", "keys"], load: async () => (await import("./serve.js")).registerServeCommands },
];

/**
 * The program for `args`: when they start with a command's name, only that command's group is
 * loaded (nothing else is needed to parse them); for `--version`, none; otherwise (help, options
 * first, a usage error) every group.
 */
export async function createProgram(args: readonly string[] = []): Promise<Command> {
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
  const first = args[0];
  if (first === "-V" || first === "--version") return program; // needs no command
  const only = first === undefined ? undefined : COMMAND_GROUPS.find((g) => g.names.includes(first));
  for (const group of only ? [only] : COMMAND_GROUPS) (await group.load())(program);
  return program;
}

function version(): string {
  try {
    return (JSON.parse(readFileSync(join(packageRoot(), "package.json"), "utf8")) as { version: string }).version;
  } catch {
    return "unknown";
  }
}
