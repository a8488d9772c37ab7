/** Benchmark group `project`: the declarative layer: resolving a 20-image project, and a layered bake. */
import { cpSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadProject } from "../../src/config/loader.js";
import { packageRoot } from "../../src/engine/artifacts.js";
import { buildImageGraph } from "../../src/graph/graph.js";
import { buildGraph } from "../../src/project/build.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const projectGroup: BenchGroup = {
  name: "project",
  metrics: ["graph_resolve_20_images_ms", "layered_bake_ms"],
  run: (ctx) => projectBenchmarks(ctx),
};

/**
 * The declarative layer on the 20-image test project (test/fixtures/monorepo), all baked:
 * loading the config and modules, building the graph, bundling and keying every image and
 * verifying every snapshot, as `supermachine build` does when nothing changed. And a layered
 * bake: a child of busybox whose warmup runs one exec, its parent cached.
 */
async function projectBenchmarks(ctx: BenchContext): Promise<void> {
  const { quick, record, progress } = ctx;
  const root = packageRoot();
  const dir = mkdtempSync(join(tmpdir(), "sm-bench-project-"));
  try {
    cpSync(join(root, "test/fixtures/monorepo"), dir, { recursive: true });
    const resolveAll = async () => {
      const project = await loadProject({ cwd: dir });
      const graph = buildImageGraph(project.images);
      return buildGraph(graph, { root: project.root, snapshotsDir: project.snapshotsDir!, handoff: false });
    };
    progress("baking the 20-image project once ...");
    const baked = await resolveAll();
    if ([...baked.values()].some((n) => n.error)) throw [...baked.values()].find((n) => n.error)!.error!;
    const samples: number[] = [];
    for (let i = 0; i < (quick ? 5 : 20); i++) {
      const t0 = performance.now();
      const nodes = await resolveAll();
      samples.push(performance.now() - t0);
      if (![...nodes.values()].every((n) => n.status === "cached")) throw new Error("the project was not all cached");
    }
    record("graph_resolve_20_images_ms", samples);
    const layered: number[] = [];
    for (let i = 0; i < (quick ? 2 : 5); i++) {
      const graph = buildImageGraph([
        { name: "base", module: null, from: null, definition: { ref: "builtin:busybox" } },
        { name: `child`, module: null, from: "base", definition: { warmupTag: `bench-${i}-${Date.now()}`, warmup: async (w) => void (await w.exec({ argv: ["echo", "warm"] })) } },
      ]);
      await buildGraph(graph, { names: ["base"], snapshotsDir: join(dir, "layered"), handoff: false });
      const t0 = performance.now();
      const nodes = await buildGraph(graph, { snapshotsDir: join(dir, "layered"), handoff: false });
      const ms = performance.now() - t0;
      if (nodes.get("base")!.status !== "cached" || nodes.get("child")!.status !== "baked") throw new Error("expected a cached parent and a baked child");
      layered.push(ms);
    }
    record("layered_bake_ms", layered);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
