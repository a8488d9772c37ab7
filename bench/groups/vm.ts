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

/**
 * An exec round trip (`vm.exec` of `echo hi`, host to guest and back) and its peer, the guest's
 * own spawn floor (the agent spawns and reaps `/bin/true` itself, no host, no cgroup, no pipes:
 * what no exec can beat), measured in turns: a block of execs, then a block of spawns, and so
 * on, so that a slow spell of a shared host weighs on both alike. The median of the blocks'
 * ratios is printed.
 */
export const execGroup: BenchGroup = {
  name: "exec",
  metrics: ["exec_roundtrip_ms", "guest_spawn_floor_ms"],
  sharedVm: true,
  async run(ctx) {
    const vm = await ctx.sharedVm();
    const agent = vm.machine.agent;
    for (let i = 0; i < 20; i++) await vm.exec({ argv: ["echo", "hi"] });
    await agent.spawnBench(["/bin/true"], 10);
    const blocks = ctx.quick ? 3 : 10;
    const execs: number[] = [];
    const spawns: number[] = [];
    const ratios: number[] = [];
    for (let b = 0; b < blocks; b++) {
      const block: number[] = [];
      for (let i = 0; i < (ctx.quick ? 50 : 100); i++) {
        const t0 = performance.now();
        const r = await vm.exec({ argv: ["echo", "hi"] });
        block.push(performance.now() - t0);
        if (r.exitCode !== 0) throw new Error(`echo exited ${r.exitCode}`);
      }
      const floor = await agent.spawnBench(["/bin/true"], ctx.quick ? 34 : 30);
      execs.push(...block);
      spawns.push(...floor);
      ratios.push(median(block) / median(floor));
    }
    ctx.record("exec_roundtrip_ms", execs);
    ctx.record("guest_spawn_floor_ms", spawns);
    ctx.progress(`exec_roundtrip_ms / guest_spawn_floor_ms: ${median(ratios).toFixed(2)}x (median of ${blocks} blocks' ratios)`);
  },
};

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)]!;
}

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
