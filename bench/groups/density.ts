/** Benchmark group `density`: memory per idle VM with many VMs of one snapshot. */
import { memoryBreakdown, memoryOf, type MemoryBreakdown } from "../util.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const densityGroup: BenchGroup = {
  name: "density",
  metrics: ["idle_vm_pss_mib", "idle_vm_rss_mib", "idle_vm_anon_pss_mib", "idle_vm_guest_ram_pss_mib"],
  run: (ctx) => densityBenchmark(ctx),
};

/**
 * PSS per idle VM with many VMs restored from one snapshot (shared RAM pages counted once), and
 * where it goes (issue 22): the guest RAM file's share, anonymous memory (TCG's translation
 * buffer, QEMU's heap), the binary and the libraries, per VM, printed as a table.
 */
async function densityBenchmark(ctx: BenchContext): Promise<void> {
  const { quick, recordValue, progress } = ctx;
  const image = await ctx.busybox();
  const count = quick ? 5 : 20;
  const pool = await image.pool({ min: 0, max: count, restoreOnRelease: false });
  try {
    const vms = [];
    for (let i = 0; i < count; i++) vms.push(await pool.acquire());
    await new Promise((r) => setTimeout(r, 2_000));
    const pss = vms.map((v) => memoryOf(v.pid).pss);
    const rss = vms.map((v) => memoryOf(v.pid).rss);
    recordValue("idle_vm_pss_mib", pss.reduce((a, b) => a + b, 0) / count, count, "MiB");
    recordValue("idle_vm_rss_mib", rss.reduce((a, b) => a + b, 0) / count, count, "MiB");
    const parts = vms.map((v) => memoryBreakdown(v.pid));
    const mean = (k: keyof MemoryBreakdown) => Math.round((parts.reduce((a, b) => a + b[k], 0) / count) * 100) / 100;
    recordValue("idle_vm_anon_pss_mib", mean("anonymous"), count, "MiB");
    recordValue("idle_vm_guest_ram_pss_mib", mean("guestRam"), count, "MiB");
    const rows = (["anonymous", "guestRam", "binary", "libraries", "other"] as const).map((k) => `${k.padEnd(10)} ${mean(k).toFixed(2).padStart(7)}`);
    progress([`idle VM memory, PSS per VM with ${count} VMs of one snapshot (MiB):`, ...rows].join("\n"));
    await Promise.all(vms.map((v) => v.release()));
  } finally {
    await pool.shutdown();
  }
}
