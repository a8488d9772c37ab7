import { execFileSync, spawnSync } from "node:child_process";

/** Pids of qemu-system processes currently on the machine. */
export function qemuPids(): number[] {
  const r = spawnSync("pgrep", ["-f", "qemu-system"], { encoding: "utf8" });
  return r.stdout.split("\n").filter(Boolean).map(Number);
}

export function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    // A zombie still answers kill(0); check its state.
    const stat = execFileSync("cat", [`/proc/${pid}/stat`], { encoding: "utf8" });
    return !/^\d+ \(.*\) Z/.test(stat);
  } catch {
    return false;
  }
}

export async function waitFor(cond: () => boolean, ms: number, step = 20): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, step));
  }
  return cond();
}
