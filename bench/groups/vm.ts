/**
 * Benchmark groups of one VM's basics: a cold boot to the agent's first answer, the guest's own
 * spawn floor (the peer of every exec figure), an exec round trip, and a VM's memory.
 */
import { MicroVm } from "../../src/engine/qemu.js";
import type { BenchGroup } from "../harness.js";
import { memoryOf } from "../util.js";

export const bootGroup: BenchGroup = {
  name: "boot",
  metrics: ["boot_to_ready_ms"],
  async run(ctx) {
    const image = await ctx.busybox();
    const spec = { rootfs: image.rootfsPath, memoryMib: image.memoryMib, vcpus: image.vcpus };
    const samples: number[] = [];
    for (let i = 0; i < (ctx.quick ? 3 : 10); i++) {
      const vm = await MicroVm.launch(spec);
      samples.push(vm.bootMs);
      await vm.kill();
    }
    ctx.record("boot_to_ready_ms", samples);
  },
};

export const spawnFloorGroup: BenchGroup = {
  name: "spawn-floor",
  metrics: ["guest_spawn_floor_ms"],
  sharedVm: true,
  async run(ctx) {
    const agent = (await ctx.sharedVm()).machine.agent;
    await agent.spawnBench(["/bin/true"], 10);
    ctx.record("guest_spawn_floor_ms", await agent.spawnBench(["/bin/true"], ctx.quick ? 100 : 300));
  },
};

export const execGroup: BenchGroup = {
  name: "exec",
  metrics: ["exec_roundtrip_ms"],
  sharedVm: true,
  async run(ctx) {
    const vm = await ctx.sharedVm();
    for (let i = 0; i < 20; i++) await vm.exec({ argv: ["echo", "hi"] });
    const samples: number[] = [];
    for (let i = 0; i < (ctx.quick ? 150 : 1000); i++) {
      const t0 = performance.now();
      const r = await vm.exec({ argv: ["echo", "hi"] });
      samples.push(performance.now() - t0);
      if (r.exitCode !== 0) throw new Error(`echo exited ${r.exitCode}`);
    }
    ctx.record("exec_roundtrip_ms", samples);
  },
};

export const memoryGroup: BenchGroup = {
  name: "memory",
  metrics: ["vm_rss_mib", "vm_pss_mib"],
  sharedVm: true,
  async run(ctx) {
    const vm = await ctx.sharedVm();
    await new Promise((r) => setTimeout(r, 2_000));
    const m = memoryOf(vm.pid);
    ctx.recordValue("vm_rss_mib", m.rss, 1, "MiB");
    ctx.recordValue("vm_pss_mib", m.pss, 1, "MiB");
  },
};
