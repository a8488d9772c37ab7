// Child processes for tests, without blocking the worker: spawnSync and execFileSync stop the
// worker's event loop for as long as the child runs (a CLI build: minutes under TCG), and vitest's
// worker then misses its RPC deadline ("Timeout calling onTaskUpdate") and fails the run even
// when every test passed. `run` resolves to what spawnSync(..., { encoding: "utf8" }) returns.
import { spawn, type ChildProcess } from "node:child_process";
import { join } from "node:path";

export interface RunResult {
  /** Exit code; null when a signal ended the child or it could not start. */
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** Set when the child could not start, or was killed at `timeout` (code ETIMEDOUT), as spawnSync does. */
  error?: NodeJS.ErrnoException;
}

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Milliseconds before the child is sent `killSignal` (as spawnSync's `timeout`). */
  timeout?: number;
  /** What `timeout` sends (default SIGTERM). */
  killSignal?: NodeJS.Signals;
  /** Written to the child's stdin, which is then closed (closed at once without it). */
  input?: string | Buffer;
  uid?: number;
  gid?: number;
}

export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const { timeout, input, killSignal = "SIGTERM", ...spawnOpts } = opts;
  return new Promise((resolve) => {
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let error: NodeJS.ErrnoException | undefined;
    let settled = false;
    let timer: NodeJS.Timeout | undefined;
    const finish = (status: number | null, signal: NodeJS.Signals | null) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      const result: RunResult = { status, signal, stdout: Buffer.concat(out).toString("utf8"), stderr: Buffer.concat(err).toString("utf8") };
      if (error) result.error = error;
      resolve(result);
    };
    let child: ChildProcess;
    try {
      child = spawn(cmd, args, { ...spawnOpts, stdio: ["pipe", "pipe", "pipe"] });
    } catch (e) {
      error = e as NodeJS.ErrnoException;
      finish(null, null);
      return;
    }
    child.stdout!.on("data", (c: Buffer) => out.push(c));
    child.stderr!.on("data", (c: Buffer) => err.push(c));
    // A child that exits without reading its input must not fail the test with EPIPE.
    child.stdin!.on("error", () => {});
    child.stdin!.end(input);
    child.once("error", (e: NodeJS.ErrnoException) => {
      error = e;
      // A child that never started emits no close.
      if (child.pid === undefined) finish(null, null);
    });
    child.once("close", (code, signal) => finish(code, signal));
    if (timeout) {
      timer = setTimeout(() => {
        error = Object.assign(new Error(`${cmd} ${args.join(" ")} timed out after ${timeout} ms`), { code: "ETIMEDOUT" });
        child.kill(killSignal);
      }, timeout);
    }
  });
}

/** Like execFileSync: the child's stdout, or an error naming the command and its stderr when it fails. */
export async function runOk(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<string> {
  const r = await run(cmd, args, opts);
  if (r.error || r.status !== 0) {
    throw new Error(`${cmd} ${args.join(" ")} failed (${r.error?.message ?? `exit ${r.status ?? r.signal}`}): ${r.stderr.trim()}`);
  }
  return r.stdout;
}

const CLI = join(import.meta.dirname, "..", "..", "dist", "src", "cli", "main.js");

/** The `supermachine` command as users run it (dist/, which setup compiles). */
export function cli(args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return run(process.execPath, [CLI, ...args], opts);
}

/**
 * `env` with SUPERMACHINE_HOME at the home setup used (test/helpers/tier-home.ts hands it over as
 * SUPERMACHINE_TEST_SETUP_HOME), for what must see this host as setup left it: `setup --check`,
 * pack:all (which takes setup's artifacts, and would build them into a scratch home).
 */
export function setupHomeEnv(env: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  const home = env.SUPERMACHINE_TEST_SETUP_HOME;
  return home ? { ...env, SUPERMACHINE_HOME: home } : { ...env };
}
