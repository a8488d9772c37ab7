import { execFileSync, spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { gunzipSync } from "node:zlib";
import { afterAll, beforeAll } from "vitest";
import { Image, type Pool, type PoolOptions, type Vm } from "../../src/index.js";
import { homePaths } from "../../src/paths.js";

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

/** The layer of the built-in busybox image, uncompressed (a base layer for test images). */
export function busyboxLayer(): Buffer {
  const layout = join(homePaths().builtin, "busybox");
  const blob = (d: string) => readFileSync(join(layout, "blobs", "sha256", d.slice("sha256:".length)));
  const index = JSON.parse(readFileSync(join(layout, "index.json"), "utf8")) as { manifests: { digest: string }[] };
  const manifest = JSON.parse(blob(index.manifests[0]!.digest).toString()) as { layers: { digest: string }[] };
  return gunzipSync(blob(manifest.layers[0]!.digest));
}

/**
 * Registers hooks that bake the built-in busybox image, open a pool and acquire one VM before
 * the file's tests, and shut the pool down after them. Read `ctx.vm` / `ctx.pool` inside tests.
 */
export function useBusyboxVm(poolOptions: PoolOptions = { min: 1, max: 1 }): { readonly vm: Vm; readonly pool: Pool } {
  let pool: Pool | undefined;
  let vm: Vm | undefined;
  beforeAll(async () => {
    const image = await Image.build({ ref: "builtin:busybox" });
    pool = await image.pool(poolOptions);
    vm = await pool.acquire();
  });
  afterAll(async () => {
    await pool?.shutdown();
  });
  return {
    get vm() {
      return vm!;
    },
    get pool() {
      return pool!;
    },
  };
}
