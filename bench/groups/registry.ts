/** Benchmark group `registry`: pulls from a registry on loopback. */
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { resolveImage } from "../../src/image/resolve.js";
import { Image } from "../../src/runtime/image.js";
import { fixtures, registryConfig, waitForHttp } from "../util.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const registryGroup: BenchGroup = {
  name: "registry",
  metrics: ["pull_python_ms", "build_cached_image_ms"],
  run: (ctx) => registryBenchmarks(ctx),
};

/**
 * Pull figures against a real registry on loopback (Debian's docker-registry) holding the
 * python fixture image: a cold pull into an empty store (network, verification, squashfs), and
 * Image.build of an image that is already local.
 */
async function registryBenchmarks(ctx: BenchContext): Promise<void> {
  const { quick, record, progress } = ctx;
  const { writeRegistryConfig, freePort } = await registryConfig();
  const fx = await (await fixtures()).ensureFixtures({ only: ["python"], log: progress });
  const dir = mkdtempSync(join(tmpdir(), "sm-bench-registry-"));
  const port = await freePort();
  const registry = spawn("docker-registry", ["serve", writeRegistryConfig({ dir, port })], { stdio: "ignore" });
  const homes: string[] = [];
  try {
    await waitForHttp(`http://127.0.0.1:${port}/v2/`);
    execFileSync("skopeo", ["copy", "--quiet", "--dest-tls-verify=false", `oci:${fx.python.layout}:${fx.python.tag}`, `docker://127.0.0.1:${port}/library/python:3-bookworm`]);
    const ref = `127.0.0.1:${port}/library/python:3-bookworm`;
    const cold: number[] = [];
    for (let i = 0; i < (quick ? 1 : 3); i++) {
      const home = mkdtempSync(join(tmpdir(), "sm-bench-home-"));
      homes.push(home);
      const t0 = performance.now();
      await resolveImage(ref, { home });
      cold.push(performance.now() - t0);
    }
    record("pull_python_ms", cold);
    const saved = process.env.SUPERMACHINE_HOME;
    process.env.SUPERMACHINE_HOME = homes[0]!;
    try {
      await Image.build({ ref }); // the first build bakes the snapshot; measure the cached ones
      const cached: number[] = [];
      for (let i = 0; i < (quick ? 30 : 100); i++) {
        const t0 = performance.now();
        await Image.build({ ref });
        cached.push(performance.now() - t0);
      }
      record("build_cached_image_ms", cached);
    } finally {
      if (saved === undefined) delete process.env.SUPERMACHINE_HOME;
      else process.env.SUPERMACHINE_HOME = saved;
    }
  } finally {
    registry.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
    for (const h of homes) rmSync(h, { recursive: true, force: true });
  }
}
