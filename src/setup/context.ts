/**
 * What a setup run knows about itself: the package's root and whether it is this repository or
 * an installed package (no src/: only the guest artifacts are set up, never npm or tsc), the
 * cache directory, the flags, and how it talks (progress on stderr; stdout belongs to --json
 * and to the command setup runs before, such as `npm run bench -- --json`).
 */
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { availableParallelism, homedir } from "node:os";
import { join } from "node:path";
import { SetupError } from "../errors.js";
import { supermachineHome } from "../paths.js";

export interface SetupFlags {
  /** Report what is missing; install, build and create nothing. */
  check?: boolean;
  /** One JSON object on stdout. */
  json?: boolean;
  /** Print only when something is done. */
  quiet?: boolean;
  skipApt?: boolean;
  /** Only the guest artifacts (what an installed package sets up), even in the repository. */
  artifactsOnly?: boolean;
  /** In the repository, what the bootstrap (scripts/setup.mjs) found of node_modules and dist/, for --check. */
  repoState?: { nodeModules: boolean; dist: boolean };
}

export interface SetupContext {
  root: string;
  home: string;
  /** The home setup would use without SUPERMACHINE_HOME (`~/.cache/supermachine`). */
  defaultHome: string;
  isRepo: boolean;
  artifactsOnly: boolean;
  flags: SetupFlags;
  /** How to run setup again, for hints: the npm script here, the CLI in a dependent project. */
  setupCmd: string;
  /** PATH with rustup's default location appended, for hosts where cargo is not on PATH. */
  buildEnv: NodeJS.ProcessEnv;
  cores: number;
  say(message: string): void;
  note(message: string): void;
}

export function setupContext(root: string, flags: SetupFlags, env: NodeJS.ProcessEnv = process.env): SetupContext {
  const isRepo = existsSync(join(root, "src")) && existsSync(join(root, "tsconfig.json")) && existsSync(join(root, "package-lock.json"));
  const artifactsOnly = flags.artifactsOnly === true || !isRepo;
  const quiet = flags.quiet === true || (flags.json === true && !flags.check);
  const say = (m: string) => void process.stderr.write(`[setup] ${m}\n`);
  return {
    root,
    home: supermachineHome(env),
    defaultHome: supermachineHome({ ...env, SUPERMACHINE_HOME: undefined }),
    isRepo,
    artifactsOnly,
    flags,
    setupCmd: isRepo && !flags.artifactsOnly ? "npm run setup" : "npx supermachine setup",
    buildEnv: { ...env, PATH: `${env.PATH ?? "/usr/bin:/bin"}:${join(homedir(), ".cargo", "bin")}` },
    cores: Math.max(1, availableParallelism()),
    say,
    note: (m) => quiet || say(m),
  };
}

/** Rough costs measured on the project's 2-core reference machine, scaled by cores. */
export function estimates(cores: number): Record<"packages" | "kernel" | "agent" | "busybox", number> {
  return { packages: 60, kernel: Math.round((17 * 60) / Math.min(cores, 16)), agent: 30, busybox: 5 };
}

/** "8.5 min", "40 s". */
export const duration = (s: number): string => (s >= 90 ? `${(s / 60).toFixed(1)} min` : `${Math.max(1, Math.round(s))} s`);
export const secs = (t0: number): string => `${((Date.now() - t0) / 1000).toFixed(1)} s`;

export function sha256(...parts: Array<string | Buffer>): string {
  const h = createHash("sha256");
  for (const p of parts) h.update(p).update("\0");
  return h.digest("hex");
}

/**
 * Runs a tool with its output on stderr (stdout belongs to --json and to the command setup runs
 * before); a failure is a SetupError naming the command.
 */
export function run(ctx: SetupContext, cmd: string, argv: string[], opts: { env?: NodeJS.ProcessEnv } = {}): void {
  const r = spawnSync(cmd, argv, { stdio: ["ignore", 2, 2], cwd: ctx.root, ...(opts.env ? { env: opts.env } : {}) });
  if (r.error) throw new SetupError("SETUP_COMMAND_FAILED", `${cmd} could not start: ${r.error.message}`);
  if (r.status !== 0) throw new SetupError("SETUP_COMMAND_FAILED", `${cmd} ${argv.join(" ")} exited with ${r.status ?? r.signal}`);
}

/** A Debian package's installed version, or "unknown". */
export function dpkgVersion(pkg: string): string {
  const r = spawnSync("dpkg-query", ["-W", "-f=${Version}", pkg], { encoding: "utf8" });
  return r.status === 0 ? r.stdout.trim() : "unknown";
}
