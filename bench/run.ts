/**
 * `npm run bench [-- --json] [-- --quick]`: benchmarks on real microVMs, reported as the
 * project's bench contract says (one JSON object on stdout with --json; progress on stderr).
 */
import { execFileSync, spawn } from "node:child_process";
import { copyFileSync, cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { cpus, release, tmpdir, totalmem } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { chooseAccel } from "../src/engine/accel.js";
import { packageRoot } from "../src/engine/artifacts.js";
import { MicroVm } from "../src/engine/qemu.js";
import { resolveImage } from "../src/image/resolve.js";
import { connect, type Socket } from "node:net";
import { buildGraph } from "../src/project/build.js";
import { ProjectWatcher, type WatchEvent } from "../src/project/watch.js";
import { loadProject } from "../src/config/loader.js";
import { buildImageGraph } from "../src/graph/graph.js";
import { Image } from "../src/runtime/image.js";
import type { Vm } from "../src/runtime/vm.js";
import { exportSnapshots } from "../src/transfer/index.js";
import { importSnapshots } from "../src/project/cache.js";
import { concurrentAcquires, hostResources, privateTempDirs, quiesce, runExecSoak, vmLoop } from "./load.js";

interface Metric {
  p50?: number;
  p99?: number;
  value?: number;
  n: number;
  unit: string;
}

const { values } = parseArgs({ options: { json: { type: "boolean" }, quick: { type: "boolean" }, only: { type: "string" } } });
const quick = values.quick ?? false;
const results: Record<string, Metric> = {};
const progress = (m: string) => process.stderr.write(`[bench] ${m}\n`);
const MiB = 1024 * 1024;

function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i]!;
}

function record(name: string, samples: number[], unit = "ms"): void {
  const s = [...samples].sort((a, b) => a - b);
  const round = (x: number) => Math.round(x * 1000) / 1000;
  results[name] = { p50: round(quantile(s, 0.5)), p99: round(quantile(s, 0.99)), n: s.length, unit };
  progress(`${name}: p50 ${results[name]!.p50} ${unit}, p99 ${results[name]!.p99} ${unit} (n=${s.length})`);
}

function recordValue(name: string, value: number, n: number, unit: string): void {
  results[name] = { value: Math.round(value * 100) / 100, n, unit };
  progress(`${name}: ${results[name]!.value} ${unit}`);
}

/** Runs one benchmark group; `--only <text>` keeps the groups whose first metric contains it. */
async function skip(name: string, fn: () => Promise<void>): Promise<void> {
  if (values.only && !name.includes(values.only)) return;
  try {
    await fn();
  } catch (err) {
    progress(`${name}: not measured: ${(err as Error).message}`);
  }
}

/** RSS and PSS of one process, from smaps_rollup (kB → MiB). */
function memoryOf(pid: number): { rss: number; pss: number } {
  const text = readFileSync(`/proc/${pid}/smaps_rollup`, "utf8");
  const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? NaN);
  return { rss: kb("Rss") / 1024, pss: kb("Pss") / 1024 };
}

const image = await Image.build({ ref: "builtin:busybox" });
const spec = { rootfs: image.rootfsPath, memoryMib: image.memoryMib, vcpus: image.vcpus };

await skip("boot_to_ready_ms", async () => {
  const n = quick ? 3 : 10;
  const samples: number[] = [];
  for (let i = 0; i < n; i++) {
    const vm = await MicroVm.launch(spec);
    samples.push(vm.bootMs);
    await vm.kill();
  }
  record("boot_to_ready_ms", samples);
});

const pool = await image.pool({ min: 1, max: 1 });
const vm = await pool.acquire();
const agent = vm.machine.agent;


await skip("guest_spawn_floor_ms", async () => {
  const n = quick ? 100 : 300;
  await agent.spawnBench(["/bin/true"], 10);
  record("guest_spawn_floor_ms", await agent.spawnBench(["/bin/true"], n));
});

await skip("exec_roundtrip_ms", async () => {
  const n = quick ? 150 : 1000;
  for (let i = 0; i < 20; i++) await vm.exec({ argv: ["echo", "hi"] });
  const samples: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    const r = await vm.exec({ argv: ["echo", "hi"] });
    samples.push(performance.now() - t0);
    if (r.exitCode !== 0) throw new Error(`echo exited ${r.exitCode}`);
  }
  record("exec_roundtrip_ms", samples);
});

await skip("vm_rss_mib", async () => {
  await new Promise((r) => setTimeout(r, 2_000));
  const m = memoryOf(vm.pid);
  recordValue("vm_rss_mib", m.rss, 1, "MiB");
  recordValue("vm_pss_mib", m.pss, 1, "MiB");
});

// The streaming benchmarks write large files into the guest's RAM-backed /tmp: after the memory
// figures, and each cleans up after itself.
await skip("spawn_stream_mib_per_s", () => streamBenchmarks(vm));
await skip("tcp_forward_rtt_ms ping_roundtrip_ms", () => tcpBenchmarks(vm));
await skip("unread_flood_rss_growth_mib", () => floodBenchmark(vm));
await skip("fork_bomb_timeout_overshoot_ms sleep_timeout_overshoot_ms", () => forkBombBenchmark());

await vm.release();
await pool.shutdown();

await skip("restore_to_exec_ms", () => restoreBenchmarks());
await skip("cold_bake_ms", () => bakeBenchmarks());
await skip("acquire_idle_ms", () => acquireBenchmark());
await skip("pool_cycle_per_s", () => poolCycleBenchmark());
await skip("acquire_200_concurrent_ms exec_10k_rss_growth_mib leaked_fds_after_100_vms", () => loadBenchmarks());
await skip("idle_vm_pss_mib", () => densityBenchmark());
await skip("pull_python_ms", () => registryBenchmarks());
await skip("graph_resolve_20_images_ms layered_bake_ms", () => projectBenchmarks());
await skip("watch_rebake_ms", () => watchBenchmark());
await skip("egress_connect_ms egress_mib_per_s", () => egressBenchmarks());

/**
 * Egress (network: { allow }): a CONNECT through the guest's proxy port and the host's egress
 * proxy to a server on the host's loopback, timed in the guest (python3: connect, CONNECT, the
 * 200), with a direct connect on the host to the same server beside it; and a download through
 * the proxy (busybox wget, plain HTTP), timed by the guest's own exec duration.
 */
async function egressBenchmarks(): Promise<void> {
  const { createServer } = await import("node:http");
  const size = 64 * MiB;
  const big = Buffer.alloc(size, 0x61);
  const server = createServer((req, res) => {
    if (req.url === "/big") return res.end(big);
    res.end("ok\n");
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as { port: number }).port;
  const network = { allow: [`127.0.0.1:${port}`] };
  const fixturesMod = pathToFileURL(join(packageRoot(), "test/fixtures/build-fixtures.mjs")).href;
  const { ensureFixtures } = (await import(fixturesMod)) as { ensureFixtures(o: { only: string[]; log: (l: string) => void }): Promise<{ python: { ref: string } }> };
  const fx = await ensureFixtures({ only: ["python"], log: progress });
  const py = await Image.build({ ref: fx.python.ref });
  const pyPool = await py.pool({ min: 1, max: 1, network });
  try {
    const v = await pyPool.acquire();
    try {
      const n = quick ? 50 : 300;
      const code = [
        "import socket, os, time, json",
        "h, p = os.environ['https_proxy'].split('//')[1].split(':')",
        `req = b'CONNECT 127.0.0.1:${port} HTTP/1.1\\r\\nHost: 127.0.0.1:${port}\\r\\n\\r\\n'`,
        "out = []",
        `for i in range(${n + 20}):`,
        "    t0 = time.perf_counter()",
        "    s = socket.create_connection((h, int(p)))",
        "    s.sendall(req)",
        "    head = b''",
        "    while b'\\r\\n\\r\\n' not in head: head += s.recv(4096)",
        "    out.append((time.perf_counter() - t0) * 1000)",
        "    assert head.startswith(b'HTTP/1.1 200'), head",
        "    s.close()",
        `print(json.dumps(out[20:]))`,
      ].join("\n");
      const r = await v.exec({ argv: ["python3", "-c", code], timeoutMs: 300_000 });
      if (r.exitCode !== 0) throw new Error(`guest CONNECT loop failed: ${r.stderr.toString().trim()}`);
      const direct: number[] = [];
      for (let i = 0; i < n + 20; i++) {
        const t0 = performance.now();
        const s = await connectTcp(`127.0.0.1:${port}`);
        direct.push(performance.now() - t0);
        s.destroy();
      }
      record("egress_connect_ms", JSON.parse(r.stdout.toString()) as number[]);
      record("egress_host_direct_connect_ms", direct.slice(20));
    } finally {
      await v.release();
    }
  } finally {
    await pyPool.shutdown();
  }
  const bbPool = await image.pool({ min: 1, max: 1, network });
  try {
    const v = await bbPool.acquire();
    try {
      const rates: number[] = [];
      for (let i = 0; i < (quick ? 2 : 5); i++) {
        const r = await v.exec({ argv: ["sh", "-c", `wget -q -O /tmp/big http://127.0.0.1:${port}/big && stat -c %s /tmp/big; rm -f /tmp/big`], timeoutMs: 300_000 });
        if (r.stdout.toString().trim() !== String(size)) throw new Error(`downloaded "${r.stdout.toString().trim()}" bytes, expected ${size}: ${r.stderr.toString().trim()}`);
        rates.push(size / MiB / (r.durationMs / 1000));
      }
      record("egress_mib_per_s", rates, "MiB/s");
    } finally {
      await v.release();
    }
  } finally {
    await bbPool.shutdown();
    server.close();
  }
}

/** Watch mode: from saving a helper one child of busybox imports to its new snapshot being ready. */
async function watchBenchmark(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "sm-bench-watch-"));
  const helper = (n: number) =>
    `import type { WarmupVm } from "supermachine";\nexport async function warm(vm: WarmupVm) { await vm.exec({ argv: ["sh", "-c", "echo ${n} > /srv-n"] }); }\n`;
  try {
    mkdirSync(join(dir, "images"));
    writeFileSync(join(dir, "supermachine.config.ts"), `import { defineConfig } from "supermachine/config";\nexport default defineConfig({ images: ["./images/*.ts"], snapshotsDir: "./.snapshots" });\n`);
    writeFileSync(join(dir, "images/base.ts"), `import { defineImage } from "supermachine/config";\nexport default defineImage({ ref: "builtin:busybox" });\n`);
    writeFileSync(join(dir, "images/child.ts"), `import { defineImage } from "supermachine/config";\nimport { warm } from "../helper";\nexport default defineImage({ from: "base", warmup: warm });\n`);
    writeFileSync(join(dir, "helper.ts"), helper(0));
    const watcher = new ProjectWatcher({ cwd: dir, debounceMs: 50 });
    await watcher.start();
    try {
      const samples: number[] = [];
      for (let i = 1; i <= (quick ? 3 : 8); i++) {
        const done = new Promise<void>((resolve, reject) => {
          const on = (e: WatchEvent) => {
            if (e.type === "round-done" && e.round.rekeyed.includes("child")) {
              watcher.off("event", on);
              resolve();
            } else if (e.type === "round-failed") reject(e.error);
          };
          watcher.on("event", on);
        });
        const t0 = performance.now();
        writeFileSync(join(dir, "helper.ts"), helper(i));
        await done;
        samples.push(performance.now() - t0);
      }
      record("watch_rebake_ms", samples);
    } finally {
      await watcher.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await skip("cache_export_ms cache_import_ms cache_push_ms cache_pull_ms parent_push_bytes child_push_bytes unchanged_push_chunks", () => cacheBenchmarks());
await skip("stale_lock_takeover_ms", () => staleLockBenchmark());
await skip("first_hello_s setup_noop_ms", () => installBenchmarks());

/**
 * A writer SIGKILLed while it holds a store entry's lock (a bake killed mid-way): time from the
 * next publisher's call to its write starting, i.e. to the dead writer's lock being taken over.
 */
async function staleLockBenchmark(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "sm-bench-lock-"));
  const publishJs = new URL("../src/store/publish.js", import.meta.url).href;
  try {
    const samples: number[] = [];
    for (let i = 0; i < (quick ? 5 : 15); i++) {
      const target = join(dir, `entry-${i}`);
      const code = `import { publish } from ${JSON.stringify(publishJs)};
        await publish({ target: ${JSON.stringify(target)}, kind: "dir", what: "bench entry", check: async () => undefined,
          write: async () => { console.log("writing"); await new Promise(() => setInterval(() => {}, 1000)); } });`;
      const c = spawn(process.execPath, ["--input-type=module", "-e", code], { stdio: ["ignore", "pipe", "inherit"] });
      await new Promise<void>((resolve, reject) => {
        c.stdout!.on("data", (d: Buffer) => d.toString().includes("writing") && resolve());
        c.once("exit", () => reject(new Error("the writer exited before writing")));
      });
      const gone = new Promise((r) => c.once("exit", r));
      c.kill("SIGKILL");
      await gone;
      const { publish } = await import("../src/store/publish.js");
      const t0 = performance.now();
      let took = NaN;
      await publish({ target, kind: "dir", what: "bench entry", check: async () => undefined, write: async () => void (took = performance.now() - t0) });
      samples.push(took);
    }
    record("stale_lock_takeover_ms", samples);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Snapshot transfer (src/transfer): one busybox snapshot exported to and imported from a
 * directory and a registry on loopback (each import into an empty home, root filesystem
 * included), and what a child whose warmup writes one small file adds to a registry that has
 * its parent, beside what the parent took; then a push of both again, which moves no chunk.
 */
async function cacheBenchmarks(): Promise<void> {
  const root = packageRoot();
  const work = mkdtempSync(join(tmpdir(), "sm-bench-cache-"));
  const registryMod = pathToFileURL(join(root, "test/fixtures/registry-config.mjs")).href;
  const { writeRegistryConfig, freePort } = (await import(registryMod)) as {
    writeRegistryConfig(o: { dir: string; port: number }): string;
    freePort(): Promise<number>;
  };
  const port = await freePort();
  const regDir = join(work, "registry");
  // stdio ignored: nothing here reads the registry's request log, which would otherwise fill its pipe.
  const registry = spawn("docker-registry", ["serve", writeRegistryConfig({ dir: regDir, port })], { stdio: "ignore" });
  const saved = process.env.SUPERMACHINE_HOME;
  const inHome = async <T>(home: string, fn: () => Promise<T>): Promise<T> => {
    process.env.SUPERMACHINE_HOME = home;
    try {
      return await fn();
    } finally {
      if (saved === undefined) delete process.env.SUPERMACHINE_HOME;
      else process.env.SUPERMACHINE_HOME = saved;
    }
  };
  try {
    await waitForHttp(`http://127.0.0.1:${port}/v2/`);
    const graph = buildImageGraph([
      { name: "base", module: null, from: null, definition: { ref: "builtin:busybox" } },
      { name: "child", module: null, from: "base", definition: { warmupTag: "bench-cache", warmup: async (w) => void (await w.exec({ argv: ["sh", "-c", "echo child > /tmp/child"] })) } },
    ]);
    progress("baking a busybox snapshot and a child of it ...");
    const nodes = await buildGraph(graph, { snapshotsDir: join(work, "snapshots"), handoff: false });
    const base = nodes.get("base")!.snapshot;
    const child = nodes.get("child")!.snapshot;
    if (!base || !child) throw nodes.get("child")!.error ?? nodes.get("base")!.error ?? new Error("bake failed");
    const n = quick ? 3 : 10;
    const timed = async (name: string, count: number, fn: (i: number) => Promise<void>) => {
      const samples: number[] = [];
      for (let i = 0; i < count; i++) {
        const t0 = performance.now();
        await fn(i);
        samples.push(performance.now() - t0);
      }
      record(name, samples);
    };
    const dirs = (i: number) => join(work, `dir-${i}`);
    await timed("cache_export_ms", n, async (i) => void (await exportSnapshots(dirs(i), [base])));
    await timed("cache_import_ms", n, (i) => inHome(join(work, `home-dir-${i}`), async () => {
      const r = await importSnapshots(dirs(i), [base.meta.hash], { snapshotsDir: join(work, `home-dir-${i}`, "snapshots") });
      if (r.snapshots[0]?.status !== "imported") throw new Error(`import: ${r.snapshots[0]?.status}`);
    }));
    const repo = (i: number) => `127.0.0.1:${port}/bench/cache-${i}`;
    const m = quick ? 2 : 5;
    await timed("cache_push_ms", m, async (i) => void (await exportSnapshots(repo(i), [base])));
    await timed("cache_pull_ms", m, (i) => inHome(join(work, `home-reg-${i}`), async () => {
      const r = await importSnapshots(repo(i), [base.meta.hash]);
      if (r.snapshots[0]?.status !== "imported") throw new Error(`pull: ${r.snapshots[0]?.status}`);
    }));
    const layered = `127.0.0.1:${port}/bench/layered`;
    const parent = await exportSnapshots(layered, [base]);
    const kid = await exportSnapshots(layered, [child]);
    recordValue("parent_push_bytes", parent.bytesMoved, 1, "bytes");
    recordValue("child_push_bytes", kid.bytesMoved, 1, "bytes");
    progress(`child_push_bytes / parent_push_bytes: ${((kid.bytesMoved / parent.bytesMoved) * 100).toFixed(1)}% (${kid.chunksMoved} of ${kid.snapshots[0]!.chunks} chunks)`);
    const again = await exportSnapshots(layered, [base, child]);
    recordValue("unchanged_push_chunks", again.chunksMoved, 2, "chunks");
  } finally {
    registry.kill("SIGKILL");
    rmSync(work, { recursive: true, force: true });
  }
}

/**
 * The declarative layer on the 20-image test project (test/fixtures/monorepo), all baked:
 * loading the config and modules, building the graph, bundling and keying every image and
 * verifying every snapshot, as `supermachine build` does when nothing changed. And a layered
 * bake: a child of busybox whose warmup runs one exec, its parent cached.
 */
async function projectBenchmarks(): Promise<void> {
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

/**
 * A new VM from the snapshot through the pool (a pre-started process restores it) to the first
 * `echo` answered, beside the plain way: a QEMU process started cold with -incoming on the same
 * snapshot, timed to the agent's first answer.
 */
async function restoreBenchmarks(): Promise<void> {
  const n = quick ? 8 : 20;
  const ours: number[] = [];
  const pool = await image.pool({ min: 0, max: 1, restoreOnRelease: true });
  try {
    for (let i = 0; i < n + 2; i++) {
      await waitUntil(() => pool.spareCount() > 0);
      const t0 = performance.now();
      const v = await pool.acquire();
      const r = await v.exec({ argv: ["echo", "hi"] });
      const dt = performance.now() - t0;
      if (r.stdout.toString() !== "hi\n") throw new Error("echo failed after restore");
      if (i >= 2) ours.push(dt);
      await v.release();
    }
  } finally {
    await pool.shutdown();
  }
  const plain: number[] = [];
  const spec = image.vmSpec(image.memoryMib, image.vcpus, 30_000);
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    const m = await MicroVm.launch(spec);
    plain.push(performance.now() - t0);
    await m.kill();
  }
  record("restore_to_exec_ms", ours);
  record("qemu_incoming_restore_ms", plain);
}

async function bakeBenchmarks(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "sm-bench-snapshots-"));
  try {
    const cold: number[] = [];
    for (let i = 0; i < (quick ? 1 : 3); i++) {
      const t0 = performance.now();
      await Image.build({ ref: "builtin:busybox", snapshotsDir: dir, name: `cold-${i}` });
      cold.push(performance.now() - t0);
    }
    record("cold_bake_ms", cold);
    const hit: number[] = [];
    for (let i = 0; i < (quick ? 30 : 100); i++) {
      const t0 = performance.now();
      await Image.build({ ref: "builtin:busybox", snapshotsDir: dir, name: "cold-0" });
      hit.push(performance.now() - t0);
    }
    record("cache_hit_bake_ms", hit);
    // The same bake with a warmup that runs one exec (the warmup and its bookkeeping).
    const warm: number[] = [];
    for (let i = 0; i < (quick ? 1 : 3); i++) {
      const t0 = performance.now();
      await Image.build({
        ref: "builtin:busybox",
        snapshotsDir: dir,
        name: `warm-${i}`,
        warmup: async (w) => {
          await w.exec({ argv: ["echo", "warm"] });
        },
      });
      warm.push(performance.now() - t0);
    }
    record("warmup_bake_ms", warm);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Streaming throughput through the agent channel: a 64 MiB guest file `cat` to stdout and read
 * with readStdout (guest → host), 64 MiB written to a `cat > /dev/null` with writeStdin
 * (host → guest), and a 4 MiB writeFile + readFile round trip.
 */
async function streamBenchmarks(v: Vm): Promise<void> {
  const size = 64 * MiB;
  await guestSetup(v, `head -c ${size} /dev/urandom > /tmp/big`);
  const runs = quick ? 2 : 5;
  const out: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    const child = await v.spawn({ argv: ["cat", "/tmp/big"] });
    let got = 0;
    for (;;) {
      const b = await child.readStdout(MiB);
      if (b.length === 0) break;
      got += b.length;
    }
    await child.wait();
    if (got !== size) throw new Error(`read ${got} of ${size} bytes`);
    out.push(size / MiB / ((performance.now() - t0) / 1000));
  }
  record("spawn_stream_mib_per_s", out, "MiB/s");
  const chunk = Buffer.alloc(MiB, 0x61);
  const inn: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    const child = await v.spawn({ argv: ["sh", "-c", "cat > /dev/null"] });
    for (let sent = 0; sent < size; sent += MiB) await child.writeStdin(chunk);
    await child.closeStdin();
    await child.wait();
    inn.push(size / MiB / ((performance.now() - t0) / 1000));
  }
  record("spawn_stdin_mib_per_s", inn, "MiB/s");
  const data = Buffer.alloc(4 * MiB, 0x5a);
  const files: number[] = [];
  for (let i = 0; i < (quick ? 5 : 20); i++) {
    const t0 = performance.now();
    await v.writeFile("/tmp/four", data);
    const back = await v.readFile("/tmp/four");
    files.push(performance.now() - t0);
    if (back.length !== data.length) throw new Error("short read");
  }
  record("write_read_file_4mib_ms", files);
  await v.exec({ argv: ["rm", "-f", "/tmp/big", "/tmp/four"] });
}

/**
 * TCP through vm.exposeTcp: 1-byte round trips to an echo server in the guest (busybox nc -e
 * cat; compare with ping_roundtrip_ms, the agent's own round trip), and bulk transfers each way.
 */
async function tcpBenchmarks(v: Vm): Promise<void> {
  const size = 64 * MiB;
  await guestSetup(v, `mkdir -p /www && head -c ${size} /dev/zero > /www/big && httpd -p 127.0.0.1:8080 -h /www && { nc -ll -p 7000 -e cat & sleep 0.3; }`);
  const echo = await v.exposeTcp(0, 7000);
  try {
    const s = await connectTcp(echo.localAddr);
    s.setNoDelay(true);
    const one = Buffer.from("x");
    const rtt = () =>
      new Promise<number>((res) => {
        const t0 = performance.now();
        s.once("data", () => res(performance.now() - t0));
        s.write(one);
      });
    for (let i = 0; i < 50; i++) await Promise.all([rtt(), v.machine.agent.ping()]);
    // The agent's own round trip (its peer) is sampled in the same loop, one of each in turn, so
    // that both see the same machine: the ratio of the two is what travels between machines.
    const samples: number[] = [];
    const pings: number[] = [];
    for (let i = 0; i < (quick ? 300 : 1000); i++) {
      pings.push(await v.machine.agent.ping());
      samples.push(await rtt());
    }
    record("ping_roundtrip_ms", pings);
    record("tcp_forward_rtt_ms", samples);
    s.destroy();
  } finally {
    await echo.stop();
  }
  const web = await v.exposeTcp(0, 8080);
  try {
    const down: number[] = [];
    for (let i = 0; i < (quick ? 2 : 5); i++) {
      const t0 = performance.now();
      const s = await connectTcp(web.localAddr);
      let got = 0;
      await new Promise<void>((res, rej) => {
        s.on("data", (c: Buffer) => (got += c.length));
        s.on("end", () => res());
        s.on("error", rej);
        s.write("GET /big HTTP/1.0\r\n\r\n");
      });
      if (got < size) throw new Error(`downloaded ${got} of ${size} bytes`);
      down.push(size / MiB / ((performance.now() - t0) / 1000));
    }
    record("tcp_forward_mib_per_s", down, "MiB/s");
  } finally {
    await web.stop();
    await v.exec({ argv: ["rm", "-f", "/www/big"] });
  }
  const up: number[] = [];
  const chunk = Buffer.alloc(MiB, 0x62);
  // A sink that reads in 64 KiB pieces (dd, into the guest's RAM-backed /tmp) and, once the
  // client half-closes, answers with how many bytes arrived. (busybox wc -c reads a socket at
  // ~25 MiB/s under TCG, so it would measure itself, not the forwarder.)
  await v.writeFile("/tmp/sink.sh", "#!/bin/sh\ndd of=/tmp/up bs=65536 2>/dev/null; stat -c %s /tmp/up; rm -f /tmp/up\n", { mode: 0o755 });
  await guestSetup(v, "nc -ll -p 7001 -e /tmp/sink.sh & sleep 0.3");
  const sink = await v.exposeTcp(0, 7001);
  try {
    for (let i = 0; i < (quick ? 2 : 5); i++) {
      const t0 = performance.now();
      const s = await connectTcp(sink.localAddr);
      const answer = await new Promise<string>((res, rej) => {
        let text = "";
        s.on("data", (c: Buffer) => (text += c.toString()));
        s.on("end", () => res(text));
        s.on("error", rej);
        let sent = 0;
        const pump = () => {
          while (sent < size) {
            sent += MiB;
            if (!s.write(chunk)) return void s.once("drain", pump);
          }
          s.end();
        };
        pump();
      });
      if (Number(answer.trim()) !== size) throw new Error(`the guest counted "${answer.trim()}" bytes, expected ${size}`);
      up.push(size / MiB / ((performance.now() - t0) / 1000));
    }
  } finally {
    await sink.stop();
  }
  record("tcp_forward_upload_mib_per_s", up, "MiB/s");
}

/** Runs a shell command in the guest for a benchmark's set-up; a failure ends that benchmark. */
async function guestSetup(v: Vm, script: string): Promise<void> {
  const r = await v.exec({ argv: ["sh", "-c", script], timeoutMs: 120_000 });
  if (r.exitCode !== 0) throw new Error(`guest set-up failed (exit ${r.exitCode}): ${script}: ${r.stderr.toString().trim()}`);
}

function connectTcp(addr: string): Promise<Socket> {
  const [host, port] = addr.split(":");
  return new Promise((res, rej) => {
    const s = connect({ host: host!, port: Number(port) }, () => res(s));
    s.once("error", rej);
  });
}

/**
 * Host RSS growth while a guest floods a stdout nobody reads (flow control keeps it bounded):
 * the peak RSS during the flood against the RSS just before it, after a full GC.
 */
async function floodBenchmark(v: Vm): Promise<void> {
  const seconds = quick ? 4 : 10;
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) throw new Error("run with node --expose-gc (npm run bench does)");
  gc();
  await new Promise((r) => setTimeout(r, 200));
  gc();
  const before = process.memoryUsage().rss;
  let peak = before;
  const child = await v.spawn({ argv: ["yes", "flood"] });
  const end = performance.now() + seconds * 1000;
  while (performance.now() < end) {
    peak = Math.max(peak, process.memoryUsage().rss);
    await new Promise((r) => setTimeout(r, 50));
  }
  // The guest really was producing: once read, the output flows.
  const first = await child.readStdout(MiB);
  if (!first.toString().startsWith("flood\n")) throw new Error("unexpected flood output");
  await child.signal(9);
  child.stdout.resume();
  await child.wait();
  recordValue("unread_flood_rss_growth_mib", (peak - before) / MiB, Math.round(seconds * 20), "MiB");
}

/**
 * How long past its `timeoutMs` an exec running a fork bomb returns (host clock: the call's
 * return minus the deadline), beside the same for a `sleep` that ignores the deadline as
 * quietly (the peer: what a timeout costs without any guest load). Each round on a fresh VM.
 */
async function forkBombBenchmark(): Promise<void> {
  const rounds = quick ? 3 : 7;
  const timeoutMs = quick ? 3_000 : 5_000;
  const pool = await image.pool({ min: 1, max: 1, restoreOnRelease: true });
  const bomb: number[] = [];
  const plain: number[] = [];
  try {
    for (let i = 0; i < rounds; i++) {
      const v = await pool.acquire();
      try {
        for (const [argv, into] of [[["sleep", "1000"], plain], [["sh", "-c", "f() { f | f & }; f; exec sleep 3600"], bomb]] as const) {
          const t0 = performance.now();
          const r = await v.exec({ argv: [...argv], timeoutMs });
          into.push(performance.now() - t0 - timeoutMs);
          if (!r.timedOut) throw new Error(`${argv.join(" ")} was not timed out (exit ${r.exitCode})`);
        }
      } finally {
        await v.release();
      }
    }
  } finally {
    await pool.shutdown();
  }
  record("fork_bomb_timeout_overshoot_ms", bomb);
  record("sleep_timeout_overshoot_ms", plain);
}

async function acquireBenchmark(): Promise<void> {
  const pool = await image.pool({ min: 1, max: 1, restoreOnRelease: false });
  try {
    const samples: number[] = [];
    for (let i = 0; i < (quick ? 300 : 1000); i++) {
      const t0 = performance.now();
      const v = await pool.acquire();
      samples.push(performance.now() - t0);
      await v.release();
    }
    record("acquire_idle_ms", samples);
  } finally {
    await pool.shutdown();
  }
}

async function poolCycleBenchmark(): Promise<void> {
  const seconds = quick ? 8 : 30;
  const pool = await image.pool({ min: 2, max: 2, restoreOnRelease: true });
  let cycles = 0;
  try {
    const end = performance.now() + seconds * 1000;
    const worker = async () => {
      while (performance.now() < end) {
        const v = await pool.acquire();
        await v.exec({ argv: ["echo", "hi"] });
        await v.release();
        cycles++;
      }
    };
    const t0 = performance.now();
    await Promise.all([worker(), worker()]);
    recordValue("pool_cycle_per_s", cycles / ((performance.now() - t0) / 1000), cycles, "cycles/s");
  } finally {
    await pool.shutdown();
  }
}

/**
 * Load and leaks (bench/load.ts, the same probes as test/vm/load.test.ts): 200 callers at once on
 * a pool of max 4 (acquire, exec, release; wall time), RSS growth over 10 000 execs on one VM
 * (in a fresh Node process with a fixed young generation, after 2 000 warm-up execs), and the fds
 * left open after 100 VMs were started and stopped.
 */
async function loadBenchmarks(): Promise<void> {
  const wall: number[] = [];
  for (let i = 0; i < (quick ? 1 : 3); i++) {
    const r = await concurrentAcquires(image, { n: 200, max: 4 });
    if (r.order.some((c, j) => c !== j)) throw new Error("acquires were not served in arrival order");
    progress(`200 concurrent acquires: ${Math.round(r.wallMs)} ms, at most ${r.maxInUse} in use and ${r.maxLive} QEMU processes, ${r.launched} started`);
    wall.push(r.wallMs);
  }
  record("acquire_200_concurrent_ms", wall);

  const n = quick ? 2_000 : 10_000;
  const soak = await runExecSoak({ n, warmup: quick ? 1_000 : 2_000, timeoutMs: 900_000 });
  progress(`${n} execs in ${Math.round(soak.execMs)} ms: RSS ${soak.rssBeforeMiB} -> ${soak.rssAfterMiB} MiB, heap +${soak.heapGrowthMiB} MiB, fds ${soak.fdDelta >= 0 ? "+" : ""}${soak.fdDelta}`);
  recordValue("exec_10k_rss_growth_mib", soak.rssGrowthMiB, n, "MiB");
  recordValue("exec_10k_heap_growth_mib", soak.heapGrowthMiB, n, "MiB");

  const dirs = privateTempDirs();
  let loop, leaks;
  try {
    const before = hostResources();
    loop = await vmLoop(image, { n: quick ? 20 : 100 });
    leaks = await quiesce(before);
  } finally {
    dirs.restore();
  }
  progress(`${loop.launched} VMs started and stopped in ${Math.round(loop.wallMs)} ms; left behind: ${JSON.stringify(leaks)}`);
  recordValue("leaked_fds_after_100_vms", leaks.fdDelta, loop.launched, "fds");
}

/** PSS per idle VM with many VMs restored from one snapshot (shared RAM pages counted once). */
async function densityBenchmark(): Promise<void> {
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
    await Promise.all(vms.map((v) => v.release()));
  } finally {
    await pool.shutdown();
  }
}

async function waitUntil(cond: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error("timed out waiting for a spare VM");
    await new Promise((r) => setTimeout(r, 5));
  }
}

/**
 * Pull figures against a real registry on loopback (Debian's docker-registry) holding the
 * python fixture image: a cold pull into an empty store (network, verification, squashfs), and
 * Image.build of an image that is already local.
 */
async function registryBenchmarks(): Promise<void> {
  const root = packageRoot();
  const fixturesMod = pathToFileURL(join(root, "test/fixtures/build-fixtures.mjs")).href;
  const registryMod = pathToFileURL(join(root, "test/fixtures/registry-config.mjs")).href;
  const { ensureFixtures } = (await import(fixturesMod)) as {
    ensureFixtures(o: { only: string[]; log: (l: string) => void }): Promise<{ python: { layout: string; tag: string } }>;
  };
  const { writeRegistryConfig, freePort } = (await import(registryMod)) as {
    writeRegistryConfig(o: { dir: string; port: number }): string;
    freePort(): Promise<number>;
  };
  const fx = await ensureFixtures({ only: ["python"], log: progress });
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

async function waitForHttp(url: string, ms = 15_000): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    try {
      const r = await fetch(url);
      if (r.status < 500) return;
    } catch {
      /* not listening yet */
    }
    if (Date.now() > end) throw new Error(`${url} did not answer within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Installing like an npm package (issue 11): `npm run pack:all`, a fresh project installs both
 * tarballs (the guest package carries the kernel and agent), then from an EMPTY cache directory
 * `npx supermachine setup` and a five-line hello program (first_hello_s: wall time of the two,
 * the install itself not counted), then `npx supermachine setup` with nothing to do.
 */
async function installBenchmarks(): Promise<void> {
  const root = packageRoot();
  const sh = (cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = process.env) =>
    execFileSync(cmd, args, { cwd, env, encoding: "utf8", timeout: 300_000, stdio: ["ignore", "pipe", "pipe"] });
  const tgz = JSON.parse(sh(process.execPath, [join(root, "scripts", "pack-all.mjs"), "--json"], root)) as { main: string; guest: string };
  const work = mkdtempSync(join(tmpdir(), "sm-bench-install-"));
  try {
    const project = join(work, "app");
    const home = join(work, "home");
    mkdirSync(project);
    mkdirSync(home);
    writeFileSync(join(project, "package.json"), JSON.stringify({ name: "app", private: true, type: "module" }));
    // The same first program the install tests run.
    copyFileSync(new URL("../../test/fixtures/hello.mjs", import.meta.url), join(project, "hello.mjs"));
    sh("npm", ["install", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error", tgz.main, tgz.guest], project);
    const env: NodeJS.ProcessEnv = { ...process.env, SUPERMACHINE_HOME: home };
    for (const k of ["SUPERMACHINE_KERNEL", "SUPERMACHINE_INITRAMFS", "SUPERMACHINE_NO_PREBUILT"]) delete env[k];
    const t0 = performance.now();
    const setup = JSON.parse(sh("npx", ["--no-install", "supermachine", "setup", "--skip-apt", "--json"], project, env)) as { built: string[] };
    const out = sh(process.execPath, ["hello.mjs"], project, env);
    const s = (performance.now() - t0) / 1000;
    if (out !== "exit 0: hello\n") throw new Error(`hello printed ${JSON.stringify(out)}`);
    if (setup.built.includes("kernel") || setup.built.includes("agent")) throw new Error(`setup built ${setup.built.join(", ")}: the prebuilt package was not used`);
    recordValue("first_hello_s", s, 1, "s");
    // The command with nothing to do, as installed (what npx runs), and as typed through npx,
    // whose own start is measured beside it (npx_cli_version_ms: npx and the CLI doing nothing).
    const bin = join(project, "node_modules", ".bin", "supermachine");
    const timed = (cmd: string, args: string[]): number[] => {
      const out: number[] = [];
      for (let i = 0; i < (quick ? 3 : 10); i++) {
        const t = performance.now();
        sh(cmd, args, project, env);
        out.push(performance.now() - t);
      }
      return out;
    };
    record("setup_noop_ms", timed(bin, ["setup"]));
    record("npx_setup_noop_ms", timed("npx", ["--no-install", "supermachine", "setup"]));
    const bare = timed("npx", ["--no-install", "supermachine", "--version"]);
    record("npx_cli_version_ms", bare);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

const report = {
  accel: chooseAccel().accel,
  host: { cpus: cpus().length, memGiB: Math.round(totalmem() / 2 ** 30), kernel: release() },
  results,
};
if (values.json) process.stdout.write(JSON.stringify(report, null, 2) + "\n");
else {
  for (const [k, m] of Object.entries(results)) {
    process.stdout.write(`${k.padEnd(26)} ${m.value !== undefined ? `${m.value} ${m.unit}` : `p50 ${m.p50} ${m.unit}  p99 ${m.p99} ${m.unit}  n=${m.n}`}\n`);
  }
}
