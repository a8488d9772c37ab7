/** Benchmark group `density`: memory per idle VM with many VMs of one snapshot, beside plain QEMU. */
import { MicroVm } from "../../src/engine/qemu.js";
import { memoryBreakdown, memoryOf, type MemoryBreakdown } from "../util.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const densityGroup: BenchGroup = {
  name: "density",
  metrics: [
    "idle_vm_pss_mib",
    "plain_qemu_idle_pss_mib",
    "idle_vms_per_gib",
    "idle_vm_rss_mib",
    "idle_vm_anon_pss_mib",
    "plain_qemu_anon_pss_mib",
    "idle_vm_guest_ram_pss_mib",
  ],
  run: (ctx) => densityBenchmark(ctx),
};

/** How long the VMs idle before their memory is read. */
const SETTLE_MS = 2_000;

/**
 * PSS per idle VM with many VMs restored from one snapshot by a pool (acquired: HELLO done,
 * ready for an exec), with shared pages counted once; then, as its peer, as many plain QEMU
 * processes restored from the same snapshot with the same arguments and left running without
 * a word to their agents (`PendingVm.loadOnly`), measured the same way after the pool's VMs are
 * gone (PSS divides shared pages among the processes that map them: the two sets are measured
 * apart, with the same count). Where the memory goes (the guest RAM file's share, anonymous
 * memory: TCG's translation buffer and QEMU's heap, the binary, the libraries) is printed as a
 * table for both. `idle_vms_per_gib` is 1024 / `idle_vm_pss_mib`.
 */
async function densityBenchmark(ctx: BenchContext): Promise<void> {
  const { quick, recordValue, progress } = ctx;
  const image = await ctx.busybox();
  const count = quick ? 5 : 20;
  const mean = (parts: MemoryBreakdown[], k: keyof MemoryBreakdown) => Math.round((parts.reduce((a, b) => a + b[k], 0) / parts.length) * 100) / 100;
  let ours: { pss: number; parts: MemoryBreakdown[] };
  const pool = await image.pool({ min: 0, max: count, restoreOnRelease: false });
  try {
    const vms = [];
    for (let i = 0; i < count; i++) vms.push(await pool.acquire());
    await new Promise((r) => setTimeout(r, SETTLE_MS));
    const pss = vms.map((v) => memoryOf(v.pid).pss);
    const rss = vms.map((v) => memoryOf(v.pid).rss);
    ours = { pss: pss.reduce((a, b) => a + b, 0) / count, parts: vms.map((v) => memoryBreakdown(v.pid)) };
    recordValue("idle_vm_pss_mib", ours.pss, count, "MiB");
    recordValue("idle_vm_rss_mib", rss.reduce((a, b) => a + b, 0) / count, count, "MiB");
    recordValue("idle_vms_per_gib", Math.floor(1024 / ours.pss), count, "VMs");
    recordValue("idle_vm_anon_pss_mib", mean(ours.parts, "anonymous"), count, "MiB");
    recordValue("idle_vm_guest_ram_pss_mib", mean(ours.parts, "guestRam"), count, "MiB");
    await Promise.all(vms.map((v) => v.release()));
  } finally {
    await pool.shutdown();
  }
  const spec = image.vmSpec(image.memoryMib, image.vcpus, 60_000);
  const plain = [];
  try {
    for (let i = 0; i < count; i++) {
      const p = await MicroVm.prestart(spec);
      plain.push(p);
      await p.loadOnly();
    }
    await new Promise((r) => setTimeout(r, SETTLE_MS));
    const pss = plain.map((p) => memoryOf(p.proc.pid!).pss).reduce((a, b) => a + b, 0) / count;
    const parts = plain.map((p) => memoryBreakdown(p.proc.pid!));
    recordValue("plain_qemu_idle_pss_mib", pss, count, "MiB");
    recordValue("plain_qemu_anon_pss_mib", mean(parts, "anonymous"), count, "MiB");
    const rows = (["anonymous", "guestRam", "binary", "libraries", "other"] as const).map(
      (k) => `${k.padEnd(10)} ${mean(ours.parts, k).toFixed(2).padStart(7)} ${mean(parts, k).toFixed(2).padStart(11)}`,
    );
    progress(
      [
        `idle VM memory, PSS per VM with ${count} VMs of one snapshot (MiB):`,
        `part       pool VM  plain QEMU`,
        ...rows,
        `total      ${ours.pss.toFixed(2).padStart(7)} ${pss.toFixed(2).padStart(11)}`,
      ].join("\n"),
    );
  } finally {
    await Promise.all(plain.map((p) => p.kill()));
  }
}
