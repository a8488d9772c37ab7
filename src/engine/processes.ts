/**
 * The QEMU processes this Node process owns, so that every one dies with its owner: on `exit`
 * each is SIGKILLed and its runtime directory removed, synchronously (QEMU also runs under
 * `setpriv --pdeathsig KILL`, which covers a SIGKILLed owner). Runtime directories are named
 * after their owner's pid, so a later process removes those an owner left behind.
 */
import type { ChildProcess } from "node:child_process";
import { readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { logger } from "../debug.js";
import { runtimeRoot } from "../paths.js";
import { pidAlive } from "../process.js";

const log = logger("engine");

/**
 * Every QEMU process alive in this Node process, with its runtime directory. On `exit` the
 * processes are killed and the directories removed, synchronously.
 */
const live = new Map<ChildProcess, string>();
let exitHookInstalled = false;
export function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const [p, dir] of live) {
      try {
        p.kill("SIGKILL");
      } catch {
        /* already gone */
      }
      rmSync(dir, { recursive: true, force: true });
    }
  });
  sweepStaleRunDirs();
}

export const RUN_DIR_PREFIX = "sm-";
/** `sm-<owner pid>-<random>`: the owner's pid lets a later process tell an orphan. */
const RUN_DIR_RE = /^sm-(\d+)-[A-Za-z0-9]{6}$/;

/**
 * Removes runtime directories left by processes that died without cleaning up (SIGKILL):
 * their QEMU processes died with them (pdeathsig), only the directory stayed.
 */
function sweepStaleRunDirs(): void {
  const root = runtimeRoot();
  let names: string[];
  try {
    names = readdirSync(root);
  } catch {
    return;
  }
  for (const name of names) {
    const m = RUN_DIR_RE.exec(name);
    if (!m || Number(m[1]) === process.pid || pidAlive(Number(m[1]))) continue;
    rmSync(join(root, name), { recursive: true, force: true });
    log("removed stale runtime directory %s", name);
  }
}


let launched = 0;

/** Records a QEMU process started with its runtime directory. */
export function registerProcess(p: ChildProcess, runDir: string): void {
  live.set(p, runDir);
  launched++;
}

/** Forgets a QEMU process that has exited. */
export function unregisterProcess(p: ChildProcess): void {
  live.delete(p);
}

/** QEMU processes this Node process owns now, and has started in all. */
export function engineCounters(): { live: number; launched: number } {
  return { live: live.size, launched };
}
