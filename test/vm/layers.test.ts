// Layered bakes on real VMs: a child bakes on its parent's snapshot, a grandchild sees what its
// parent's and grandparent's warmups wrote; parents bake first; a second build is all cached and
// boots nothing; a change to one node rebakes it and its descendants only.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { buildGraph } from "../../src/project/build.js";
import { engineCounters } from "../../src/engine/qemu.js";
import { buildImageGraph, type DeclaredImage } from "../../src/graph/graph.js";
import { Image } from "../../src/index.js";

const work = mkdtempSync(join(tmpdir(), "sm-layers-test-"));
const snapshotsDir = join(work, "snapshots");
afterAll(() => rmSync(work, { recursive: true, force: true }));

const marker = join(work, "mid.conf");
writeFileSync(marker, "from the host\n");

function project(midTag: string): DeclaredImage[] {
  return [
    {
      name: "base",
      module: null,
      from: null,
      definition: {
        ref: "builtin:busybox",
        env: { LEVEL: "base" },
        warmup: async (vm) => {
          await vm.exec({ argv: ["sh", "-c", "echo base > /var/base"] });
        },
      },
    },
    {
      name: "mid",
      module: null,
      from: "base",
      definition: {
        warmupTag: midTag,
        env: { LEVEL: "mid" },
        extraFiles: [{ hostPath: marker, guestPath: "/etc/mid.conf" }],
        warmup: async (vm) => {
          const r = await vm.exec({ argv: ["sh", "-c", "cat /var/base && echo mid > /var/mid"] });
          if (r.stdout.toString() !== "base\n") throw new Error(`mid did not see base's state: ${r.stdout.toString()}`);
        },
      },
    },
    {
      name: "leaf",
      module: null,
      from: "mid",
      definition: {
        warmup: async (vm) => {
          await vm.exec({ argv: ["sh", "-c", 'echo "leaf sees $LEVEL" > /var/leaf'] });
        },
      },
    },
    { name: "side", module: null, from: "base", definition: {} },
  ];
}

describe("layered bakes", () => {
  it("bakes parents first, each child on its parent's snapshot", async () => {
    const started: string[] = [];
    const nodes = await buildGraph(buildImageGraph(project("m1")), {
      snapshotsDir,
      onEvent: (e) => e.type === "start" && started.push(e.name),
    });
    expect([...nodes.values()].map((n) => [n.name, n.status])).toEqual([
      ["base", "baked"],
      ["mid", "baked"],
      ["leaf", "baked"],
      ["side", "baked"],
    ]);
    expect(started.indexOf("base")).toBe(0);
    expect(started.indexOf("mid")).toBeLessThan(started.indexOf("leaf"));
    expect(nodes.get("leaf")!.inputs.parent).toBe(nodes.get("mid")!.key);
    expect(nodes.get("mid")!.inputs.parent).toBe(nodes.get("base")!.key);

    // The grandchild has everything its ancestors' warmups and extraFiles left.
    const leaf = nodes.get("leaf")!;
    for (const n of nodes.values()) if (n.handoff) await n.handoff.kill();
    const pool = await (await Image.fromSnapshot(leaf.dir)).pool({ min: 1, max: 1 });
    try {
      const vm = await pool.acquire();
      const r = await vm.exec({ argv: ["cat", "/var/base", "/var/mid", "/etc/mid.conf", "/var/leaf"] });
      expect(r.stdout.toString()).toBe("base\nmid\nfrom the host\nleaf sees mid\n");
      expect((await vm.exec({ argv: ["sh", "-c", "echo $LEVEL"] })).stdout.toString()).toBe("mid\n");
      // The side branch has base's state and nothing of mid's.
    } finally {
      await pool.shutdown();
    }
    const side = await (await Image.fromSnapshot(nodes.get("side")!.dir)).pool({ min: 1, max: 1 });
    try {
      const vm = await side.acquire();
      expect((await vm.exec({ argv: ["sh", "-c", "cat /var/base; ls /var/mid 2>&1 || true"] })).stdout.toString()).toMatch(/^base\n.*No such file/s);
    } finally {
      await side.shutdown();
    }
  });

  it("reports everything cached the second time, booting nothing", async () => {
    const launched = engineCounters().launched;
    const nodes = await buildGraph(buildImageGraph(project("m1")), { snapshotsDir });
    expect([...nodes.values()].every((n) => n.status === "cached")).toBe(true);
    expect(engineCounters().launched).toBe(launched);
  });

  it("rebakes a changed node and its descendants only; dry-run and frozen tell without baking", async () => {
    const dry = await buildGraph(buildImageGraph(project("m2")), { snapshotsDir, dryRun: true });
    expect(Object.fromEntries([...dry.values()].map((n) => [n.name, n.status]))).toEqual({ base: "cached", mid: "would-bake", leaf: "would-bake", side: "cached" });
    await expect(buildGraph(buildImageGraph(project("m2")), { snapshotsDir, frozen: true })).rejects.toMatchObject({
      code: "BUILD_FROZEN_MISSING",
      message: expect.stringMatching(/mid .*leaf/),
    });
    const launched = engineCounters().launched;
    const nodes = await buildGraph(buildImageGraph(project("m2")), { snapshotsDir });
    expect(Object.fromEntries([...nodes.values()].map((n) => [n.name, n.status]))).toEqual({ base: "cached", mid: "baked", leaf: "baked", side: "cached" });
    expect(engineCounters().launched).toBe(launched + 2);
    for (const n of nodes.values()) if (n.handoff) await n.handoff.kill();
  });

  it("a failed parent fails its descendants without baking them", async () => {
    const images = project("m3");
    images[1]!.definition.warmup = async () => {
      throw new Error("mid broke");
    };
    const nodes = await buildGraph(buildImageGraph(images), { snapshotsDir });
    expect(nodes.get("mid")).toMatchObject({ status: "failed", error: { code: "BAKE_WARMUP_FAILED" } });
    expect(nodes.get("leaf")).toMatchObject({ status: "skipped", error: { code: "BUILD_PARENT_FAILED" } });
    expect(nodes.get("base")!.status).toBe("cached");
    for (const n of nodes.values()) if (n.handoff) await n.handoff.kill();
  });
});
