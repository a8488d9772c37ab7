// A fleet of `supermachine serve` processes for tests: nodes, each with a SUPERMACHINE_HOME of its
// own (holding only the built-in busybox layout, as a fresh host's would), on loopback addresses
// of their own (127.0.0.2, .3, ...), and fronts (`serve --front`) over them. Every process is
// the real CLI from dist/, killed at the end of the test file (or at exit if a test forgot).
import { spawn, type ChildProcess } from "node:child_process";
import { cpSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { inject } from "vitest";

const CLI = join(import.meta.dirname, "..", "..", "dist", "src", "cli", "main.js");

export interface FleetProcess {
  name: string;
  url: string;
  child: ChildProcess;
  /** Resolves with the exit code (null after a signal) and the signal. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** What it wrote on stderr (its JSON log). */
  log(): string;
  home?: string;
}

const live = new Set<ChildProcess>();
process.once("exit", () => {
  for (const c of live) c.kill("SIGKILL");
});

/** A home as a fresh host's: only the built-in busybox layout, copied from the tier's home. */
export function freshHome(name: string): string {
  const home = mkdtempSync(join(tmpdir(), `sm-fleet-${name}-`));
  cpSync(join(inject("supermachineHome"), "builtin", "busybox"), join(home, "builtin", "busybox"), { recursive: true });
  return home;
}

/** Starts `supermachine --json serve <args>` and resolves once it printed `until` ("listening" or "ready"). */
export function startServe(name: string, args: string[], opts: { cwd: string; env?: NodeJS.ProcessEnv; until?: "listening" | "ready"; timeoutMs?: number; home?: string }): Promise<FleetProcess> {
  const child = spawn(process.execPath, [CLI, "--json", "serve", ...args], {
    cwd: opts.cwd,
    env: { ...process.env, ...(opts.home ? { SUPERMACHINE_HOME: opts.home } : {}), ...opts.env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  live.add(child);
  const err: string[] = [];
  child.stderr!.on("data", (c: Buffer) => err.push(c.toString("utf8")));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once("close", (code, signal) => {
      live.delete(child);
      resolve({ code, signal });
    }),
  );
  const until = opts.until ?? "ready";
  return new Promise((resolve, reject) => {
    let buf = "";
    let url = "";
    const timer = setTimeout(() => reject(new Error(`${name}: no "${until}" within ${opts.timeoutMs ?? 120_000} ms; stderr: ${err.join("").slice(-2000)}`)), opts.timeoutMs ?? 120_000);
    child.stdout!.on("data", (c: Buffer) => {
      buf += c.toString("utf8");
      for (let i = buf.indexOf("\n"); i >= 0; i = buf.indexOf("\n")) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        let msg: { type?: string; url?: string };
        try {
          msg = JSON.parse(line);
        } catch {
          continue;
        }
        if (msg.url) url = msg.url;
        if (msg.type === until || (until === "ready" && msg.type === "listening" && args.includes("--front"))) {
          clearTimeout(timer);
          resolve({ name, url, child, exited, log: () => err.join(""), ...(opts.home ? { home: opts.home } : {}) });
        }
      }
    });
    void exited.then((r) => {
      clearTimeout(timer);
      reject(new Error(`${name} exited (${r.code ?? r.signal}) before "${until}": ${err.join("").slice(-2000)}`));
    });
  });
}

/** Stops what is still running (SIGTERM: a drain; SIGKILL after 30 s) and removes the homes. */
export async function stopAll(procs: FleetProcess[]): Promise<void> {
  const running = procs.filter((p) => p.child.exitCode === null && p.child.signalCode === null);
  for (const p of running) p.child.kill("SIGTERM");
  const timer = setTimeout(() => {
    for (const p of running) p.child.kill("SIGKILL");
  }, 30_000);
  await Promise.all(procs.map((p) => p.exited));
  clearTimeout(timer);
  for (const p of procs) if (p.home) rmSync(p.home, { recursive: true, force: true });
}

/** Child pids of `pid` (QEMU processes a node started). */
export async function childPids(pid: number): Promise<number[]> {
  const { readdirSync, readFileSync } = await import("node:fs");
  const out: number[] = [];
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid === pid) out.push(Number(d));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

export const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};
