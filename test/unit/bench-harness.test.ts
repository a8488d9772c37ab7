// The benchmark harness (bench/harness.ts): a group that throws, or forgets a metric it promised,
// ends in the report's `failed` with the reason and makes the bench exit non-zero; the groups
// keep every metric the bench has always reported. No VM: the groups here are made up, and the
// real ones are only listed.
import { describe, expect, it } from "vitest";
import { GROUPS } from "../../bench/groups/index.js";
import { formatReport, runGroups, type BenchGroup } from "../../bench/harness.js";

const never = async (): Promise<never> => {
  throw new Error("no VM in this test");
};
const run = (groups: BenchGroup[], only?: string) => runGroups(groups, { quick: true, only, progress: () => {}, busybox: never, sharedVm: never, accel: () => "tcg" });

/** The metrics `npm run bench` reported before its groups were split into files (v0.1.0). */
const V010 = ["acquire_200_concurrent_ms", "acquire_idle_ms", "boot_to_ready_ms", "build_cached_image_ms", "cache_export_ms", "cache_hit_bake_ms", "cache_import_ms", "cache_pull_ms", "cache_push_ms", "child_push_bytes", "cold_bake_ms", "egress_connect_ms", "egress_host_direct_connect_ms", "egress_mib_per_s", "exec_10k_heap_growth_mib", "exec_10k_rss_growth_mib", "exec_roundtrip_ms", "first_hello_s", "fork_bomb_timeout_overshoot_ms", "graph_resolve_20_images_ms", "guest_spawn_floor_ms", "idle_vm_pss_mib", "idle_vm_rss_mib", "layered_bake_ms", "leaked_fds_after_100_vms", "npx_cli_version_ms", "npx_setup_noop_ms", "parent_push_bytes", "ping_roundtrip_ms", "pool_cycle_per_s", "pull_python_ms", "qemu_incoming_restore_ms", "restore_to_exec_ms", "setup_noop_ms", "sleep_timeout_overshoot_ms", "spawn_stdin_mib_per_s", "spawn_stream_mib_per_s", "stale_lock_takeover_ms", "tcp_forward_mib_per_s", "tcp_forward_rtt_ms", "tcp_forward_upload_mib_per_s", "unchanged_push_chunks", "unread_flood_rss_growth_mib", "vm_pss_mib", "vm_rss_mib", "warmup_bake_ms", "watch_rebake_ms", "write_read_file_4mib_ms"];
/** Added since: the cache across a slow link (issue 18). */
const WAN = ["cache_pull_wan_ms", "cache_push_requests", "cache_push_wan_ms", "child_push_wan_ms", "python_manifest_bytes", "python_pull_wan_ms", "python_push_wan_ms", "python_skopeo_pull_wan_ms", "python_skopeo_push_wan_ms", "skopeo_pull_wan_ms", "skopeo_push_wan_ms"];
/** Added since: time to interactive through `supermachine serve` (issue 19). */
const SERVE = ["tti_burst_ms", "tti_connect_ms", "tti_e2b_ms", "tti_inprocess_ms"];
/** Added since: a fleet of nodes behind a front (issue 20). */
const FLEET = ["cold_node_first_create_ms", "fleet_cache_pull_ms", "front_create_ms", "node_create_ms"];
/** Added since: transparent egress beside the proxy (issue 21). */
const EGRESS = [
  "egress_acquire_none_ms",
  "egress_acquire_proxy_ms",
  "egress_acquire_transparent_ms",
  "egress_idle_pss_off_mib",
  "egress_idle_pss_on_mib",
  "egress_transparent_connect_ms",
  "egress_transparent_mib_per_s",
];
/** Added since: where a pool cycle's time goes (issue 22). */
const CYCLES = ["cycle_host_cpu_ms", "cycle_qemu_cpu_ms", "idle_vm_anon_pss_mib", "idle_vm_guest_ram_pss_mib", "idle_vms_per_gib", "plain_qemu_anon_pss_mib", "plain_qemu_idle_pss_mib"];
/** Added since: the public API under Node, Bun and Deno, in one run (issue 23). */
const RUNTIMES = ["acquire_idle_bun_ms", "acquire_idle_deno_ms", "acquire_idle_node_ms", "exec_roundtrip_bun_ms", "exec_roundtrip_deno_ms", "exec_roundtrip_node_ms"];
/** The serve page (issue 24). */
const PAGE = ["page_bundle_gzip_kib", "page_event_ms", "page_images_ms", "page_load_ms", "page_sandbox_visible_ms"];
const METRICS = [...V010, ...WAN, ...SERVE, ...FLEET, ...EGRESS, ...CYCLES, ...RUNTIMES, ...PAGE].sort();

describe("bench harness", () => {
  it("reports what the groups record, and exits 0", async () => {
    const { report, status } = await run([
      { name: "a", metrics: ["a_ms"], run: async (ctx) => ctx.record("a_ms", [3, 1, 2]) },
      { name: "b", metrics: ["b_bytes"], run: async (ctx) => ctx.recordValue("b_bytes", 42, 1, "bytes") },
    ]);
    expect(status).toBe(0);
    expect(report.results).toEqual({ a_ms: { p50: 2, p99: 3, n: 3, unit: "ms" }, b_bytes: { value: 42, n: 1, unit: "bytes" } });
    expect(report.failed).toBeUndefined();
  });

  it("fails the bench, naming each metric, when a group throws or forgets one, and still runs the others", async () => {
    const ran: string[] = [];
    const { report, status } = await run([
      { name: "throws", metrics: ["x_ms", "y_ms"], run: async (ctx) => { ctx.record("x_ms", [1]); throw new Error("the guest is gone"); } },
      { name: "forgets", metrics: ["z_ms"], run: async () => void ran.push("forgets") },
      { name: "fine", metrics: ["w_ms"], run: async (ctx) => { ran.push("fine"); ctx.record("w_ms", [1]); } },
      { name: "strays", metrics: ["v_ms"], run: async (ctx) => ctx.record("not_promised_ms", [1]) },
    ]);
    expect(status).toBe(1);
    expect(ran).toEqual(["forgets", "fine"]);
    expect(Object.keys(report.results).sort()).toEqual(["w_ms", "x_ms"]);
    expect(report.failed).toEqual([
      { metric: "y_ms", reason: "the guest is gone" },
      { metric: "z_ms", reason: "the group ended without recording it" },
      { metric: "v_ms", reason: "benchmark group strays records not_promised_ms, which it does not promise (add it to its metrics)" },
    ]);
    expect(formatReport(report)).toContain("y_ms                       FAILED: the guest is gone");
  });

  it("refuses a figure that is not a number", async () => {
    const { report } = await run([{ name: "nan", metrics: ["n_ms"], run: async (ctx) => ctx.record("n_ms", []) }]);
    expect(report.failed).toEqual([{ metric: "n_ms", reason: "n_ms: no valid sample" }]);
  });

  it("selects groups with --only by group or metric name", async () => {
    const groups: BenchGroup[] = [
      { name: "tcp", metrics: ["tcp_forward_rtt_ms"], run: async (ctx) => ctx.record("tcp_forward_rtt_ms", [1]) },
      { name: "cache", metrics: ["cache_push_ms"], run: async (ctx) => ctx.record("cache_push_ms", [1]) },
    ];
    expect(Object.keys((await run(groups, "push")).report.results)).toEqual(["cache_push_ms"]);
    expect(Object.keys((await run(groups, "tcp")).report.results)).toEqual(["tcp_forward_rtt_ms"]);
  });

  it("keeps every metric the bench reported, each in one group", () => {
    const all = GROUPS.flatMap((g) => g.metrics);
    expect(new Set(all).size).toBe(all.length);
    expect([...all].sort()).toEqual(METRICS);
  });
});
