// Clones are distinct: every VM restored from one snapshot (a pool's restores, the restore that
// replaces a released VM, a layered child's bake, the baked VM handed off to the first pool)
// reads different /dev/urandom output, a different boot_id and a different VM id, all
// different from what the warmup read before the capture.
import { randomUUID } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { AgentClient } from "../../src/agent/client.js";
import { buildGraph } from "../../src/project/build.js";
import type { MicroVm } from "../../src/engine/qemu.js";
import { buildImageGraph } from "../../src/graph/graph.js";
import { Image, type Vm } from "../../src/index.js";
import type { WarmupVm } from "../../src/schema/calls.js";

const work = mkdtempSync(join(tmpdir(), "sm-clones-test-"));
const snapshotsDir = join(work, "snapshots");
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** What tells one machine from another: 32 bytes of /dev/urandom, boot_id, the VM id. */
interface Ids {
  random: string;
  bootId: string;
  vmId: string;
}
const PROBE = ["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /proc/sys/kernel/random/boot_id /run/supermachine/vm-id"];
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

async function probe(vm: Pick<WarmupVm, "exec">): Promise<Ids> {
  const r = await vm.exec({ argv: PROBE, timeoutMs: 20_000 });
  expect(r.stderr.toString()).toBe("");
  const [random = "", bootId = "", vmId = ""] = r.stdout.toString().split("\n");
  expect(random).toMatch(/^[0-9a-f]{64}$/);
  expect(bootId).toMatch(UUID);
  expect(vmId).toMatch(UUID);
  return { random, bootId, vmId };
}

/** No value of any of `ids` appears twice, field by field. */
function expectAllDistinct(ids: Ids[]): void {
  for (const k of ["random", "bootId", "vmId"] as const) {
    const values = ids.map((i) => i[k]);
    expect(new Set(values).size, `${k}: ${values.join(" ")}`).toBe(values.length);
  }
}

describe("clones of one snapshot", () => {
  it("every VM a pool hands out is a new machine, the handed-off bake VM included", async () => {
    const warm: Ids[] = [];
    const image = await Image.build({
      ref: "builtin:busybox",
      snapshotsDir,
      name: "clones-base",
      // A fresh key every run: the warmup must run (and read its values) in this test.
      warmupTag: `clones-${randomUUID()}`,
      warmup: async (vm) => {
        warm.push(await probe(vm));
      },
    });
    expect(warm).toHaveLength(1);
    const handoffPid = (image as unknown as { handoff?: MicroVm }).handoff?.pid;
    expect(handoffPid).toBeGreaterThan(0);
    const pool = await image.pool({ min: 1, max: 3 });
    try {
      const vms = await Promise.all([0, 1, 2].map(() => pool.acquire()));
      // The baked VM went on running as one of them.
      expect(vms.map((v) => v.pid)).toContain(handoffPid);
      const seen: Ids[] = [];
      for (const vm of vms) {
        const ids = await probe(vm);
        expect(ids.vmId).toBe(vm.id);
        seen.push(ids);
        // One machine keeps its identity; its RNG moves on.
        const again = await probe(vm);
        expect([again.bootId, again.vmId]).toEqual([ids.bootId, ids.vmId]);
        expect(again.random).not.toBe(ids.random);
      }
      // A released VM is replaced by a new restore: a new machine again.
      await vms[0]!.release();
      const next = await pool.acquire();
      seen.push(await probe(next));
      expectAllDistinct([...warm, ...seen]);
      // boot_id stays read-only for the guest, like the kernel's own.
      const w = await next.exec({ argv: ["sh", "-c", "echo x > /proc/sys/kernel/random/boot_id"] });
      expect(w.exitCode).not.toBe(0);
      await next.release();
      for (const vm of vms.slice(1)) await vm.release();
    } finally {
      await pool.shutdown();
    }
  });

  it("a layered child bakes on a new machine, and its clones are new machines too", async () => {
    const warm: Record<string, Ids> = {};
    const tag = randomUUID();
    const nodes = await buildGraph(
      buildImageGraph([
        {
          name: "parent",
          module: null,
          from: null,
          definition: { ref: "builtin:busybox", warmupTag: `parent-${tag}`, warmup: async (vm) => void (warm.parent = await probe(vm)) },
        },
        { name: "child", module: null, from: "parent", definition: { warmupTag: `child-${tag}`, warmup: async (vm) => void (warm.child = await probe(vm)) } },
      ]),
      { snapshotsDir },
    );
    for (const n of nodes.values()) await n.handoff?.kill();
    expect([...nodes.values()].map((n) => [n.name, n.status])).toEqual([
      ["parent", "baked"],
      ["child", "baked"],
    ]);
    const pool = await (await Image.fromSnapshot(nodes.get("child")!.dir)).pool({ min: 2, max: 2 });
    try {
      const vms: Vm[] = await Promise.all([pool.acquire(), pool.acquire()]);
      const seen = [];
      for (const vm of vms) seen.push(await probe(vm));
      expectAllDistinct([warm.parent!, warm.child!, ...seen]);
    } finally {
      await pool.shutdown();
    }
  });

  it("a VM's identity changes only for a new id, and only from the host library's own port", async () => {
    const image = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "clones-plain" });
    const pool = await image.pool({ min: 1, max: 1 });
    try {
      const vm = await pool.acquire();
      const before = await probe(vm);
      // The same id again (a host reconnecting): nothing changes.
      const again = await vm.machine.agent.hello({ vmId: vm.id, timeoutMs: 10_000 });
      expect(again.vmId).toBe(vm.id);
      const same = await probe(vm);
      expect([same.bootId, same.vmId]).toEqual([before.bootId, before.vmId]);
      // A client on the exec port cannot rename the VM.
      const s = connect(vm.execPath);
      await new Promise<void>((r, j) => (s.once("connect", () => r()), s.once("error", j)));
      const client = new AgentClient(s);
      try {
        const hello = await client.hello({ vmId: "intruder", timeoutMs: 10_000 });
        expect(hello.port).toBe("supermachine.1");
        expect(hello.vmId).toBeUndefined();
      } finally {
        client.close();
      }
      const after = await probe(vm);
      expect([after.bootId, after.vmId]).toEqual([before.bootId, before.vmId]);
    } finally {
      await pool.shutdown();
    }
  });
});
