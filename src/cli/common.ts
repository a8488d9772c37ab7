/**
 * What every command module shares: exit statuses, JSON mode, option parsers, progress output.
 * Command modules never call process.exit: an action returns its status and main.ts exits.
 */
import { InvalidArgumentError, type Command } from "commander";
import type { BuildProgress } from "../schema/image.js";
import { describeWait } from "../project/progress.js";
import { isGuestPath } from "../schema/fields.js";

/** A command line that cannot be acted on; main.ts prints it on stderr and exits with status 2. */
export class UsageError extends Error {}

/**
 * Wraps a handler that resolves with an exit status into a commander action. The status goes to
 * process.exitCode, which main.ts passes to process.exit once parsing has finished.
 */
export function action<A extends unknown[]>(fn: (...args: A) => Promise<number> | number): (...args: A) => Promise<void> {
  return async (...args: A) => {
    process.exitCode = await fn(...args);
  };
}

/** True when `--json` was given (a program-wide option, accepted before or after the command name). */
export function isJson(cmd: Command): boolean {
  return cmd.optsWithGlobals<{ json?: boolean }>().json === true;
}

/** One JSON document per line on stdout. */
export function writeJson(value: unknown, pretty = false): void {
  process.stdout.write(JSON.stringify(value, null, pretty ? 2 : undefined) + "\n");
}

/** Option parser: an integer, else a usage error naming the value. */
export function integer(v: string): number {
  const n = Number(v);
  if (v.trim() === "" || !Number.isInteger(n)) throw new InvalidArgumentError(`expected an integer, got ${JSON.stringify(v)}`);
  return n;
}

/** Option parser for repeatable options: collects every occurrence. */
export function collect(v: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), v];
}

/** Option parser for `--env KEY=VALUE` (repeatable). */
export function envPair(v: string, previous: Record<string, string> | undefined): Record<string, string> {
  const i = v.indexOf("=");
  if (i <= 0) throw new InvalidArgumentError(`expected KEY=VALUE, got ${JSON.stringify(v)}`);
  return { ...previous, [v.slice(0, i)]: v.slice(i + 1) };
}

const PLATFORM_RE = /^[a-z0-9_]+\/[a-z0-9_]+(?:\/[a-z0-9_]+)?$/;

/** Option parser for `--platform os/arch[/variant]`. */
export function platform(v: string): string {
  if (!PLATFORM_RE.test(v)) throw new InvalidArgumentError(`expected os/arch[/variant] such as linux/amd64, got ${JSON.stringify(v)}`);
  return v;
}

/** Option parser for a guest directory (`--workdir`): absolute and normalised, checked before anything boots. */
export function guestDirectory(v: string): string {
  if (v !== "/" && !isGuestPath(v)) {
    throw new InvalidArgumentError(`expected an absolute, normalised guest directory such as /srv/app (no '..', '.', '//' or trailing '/'), got ${JSON.stringify(v)}`);
  }
  return v;
}

export const mb = (n: number) => `${(n / 1e6).toFixed(1)} MB`;

/** Human progress on stderr: one line per layer when it completes, and a summary. */
export function progressPrinter(json: boolean): (p: BuildProgress) => void {
  if (json) return () => {};
  const reported = new Set<string>();
  let last = 0;
  return (p) => {
    if (p.phase === "pull") {
      const e = p.event;
      if (e.type === "layer") {
        const short = e.digest.slice(7, 19);
        const done = e.cached || (e.total !== undefined && e.bytes >= e.total);
        if (done && !reported.has(e.digest)) {
          reported.add(e.digest);
          process.stderr.write(`layer ${e.index + 1}/${e.count} ${short}: ${e.cached ? "already present" : mb(e.bytes)}\n`);
        } else if (!done && performance.now() - last > 1_000) {
          last = performance.now();
          process.stderr.write(`layer ${e.index + 1}/${e.count} ${short}: ${mb(e.bytes)}${e.total ? ` of ${mb(e.total)}` : ""}\n`);
        }
      } else if (e.type === "manifest") {
        process.stderr.write(`resolving ${e.ref}\n`);
      }
    } else if (p.phase === "import") {
      process.stderr.write(`importing ${p.file}\n`);
    } else if (p.phase === "squashfs") {
      process.stderr.write("building the root filesystem\n");
    } else if (p.phase === "done") {
      process.stderr.write(`root filesystem ready: ${mb(p.sizeBytes)} in ${(p.durationMs / 1000).toFixed(1)} s\n`);
    } else if (p.phase === "bake") {
      if (p.step === "boot") process.stderr.write("baking: booting the image\n");
      else if (p.step === "warmup") process.stderr.write("baking: running the warmup\n");
      else if (p.step === "extra-files") process.stderr.write("baking: staging extraFiles\n");
      else if (p.step === "listener") process.stderr.write("baking: waiting for the workload to listen\n");
    } else if (p.phase === "bake-waiting-for-lock") {
      process.stderr.write(`${describeWait(`snapshot ${p.snapshot}`, p.holder)}\n`);
    } else if (p.phase === "waiting-for-lock") {
      process.stderr.write(`${describeWait(p.what, p.holder)}\n`);
    } else if (p.phase === "bake-damaged") {
      process.stderr.write(`snapshot ${p.snapshot} is damaged (${p.reason})${p.quarantine ? `: moved to ${p.quarantine}` : ""}; rebaking\n`);
    } else if (p.phase === "cache-refused") {
      process.stderr.write(`not imported from the cache: ${p.reason}; baking instead\n`);
    } else if (p.phase === "bake-done") {
      process.stderr.write(`snapshot baked in ${(p.durationMs / 1000).toFixed(1)} s\n`);
    }
  };
}

/** "waiting for <what>, held by pid N since 12:03:04 (5 s ago)". */
/** `pullPolicy` values, as the options accept them. */
export const PULL_POLICIES = ["always", "missing", "never"] as const;
export type PullPolicyArg = (typeof PULL_POLICIES)[number];

/** A built image as the JSON outputs show it (build, watch). */
export function nodeJson(n: { name: string; key: string; status: string; parent: string | null; ms: number; error?: Error | undefined; cacheError?: { code: string; message: string } | undefined }) {
  return {
    name: n.name,
    key: n.key,
    status: n.status,
    parent: n.parent,
    ms: n.ms,
    ...(n.cacheError ? { cacheError: n.cacheError } : {}),
    ...(n.error ? { error: { code: (n.error as { code?: string }).code ?? "ERROR", message: n.error.message } } : {}),
  };
}
