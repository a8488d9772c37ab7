// Hostile guests on real microVMs: a fork bomb, a memory hog, a tmpfs fill, a spin on every
// vCPU, a stdout flood nobody reads, garbage at the agent's ports, a guest that reboots itself.
// In each the host stays responsive (Node's event-loop lag and the time of a host process start
// are sampled throughout), QEMU's RSS stays bounded, the offending exec is limited or killed (or
// the VM dies and the pool replaces it), and other calls keep being served.
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { connect } from "node:net";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AgentClient } from "../../src/agent/client.js";
import { Image, type Pool, type Vm } from "../../src/index.js";

const execFileP = promisify(execFile);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Bounds on the host while a guest misbehaves. Generous: the test machines have 2 cores shared
 * with other work, and TCG keeps a core busy per running vCPU. A host blocked by the guest (a
 * synchronous loop over its output, a QEMU that stops answering) shows as seconds.
 */
const MAX_LAG_P99_MS = 1_000;
const MAX_HOST_SPAWN_MS = 5_000;
/** QEMU's RSS beyond the guest's RAM: the emulator itself and its translated code. */
const QEMU_OVERHEAD_MIB = 384;

interface HostSample {
  lagP99Ms: number;
  lagMaxMs: number;
  spawnMaxMs: number;
  spawns: number;
  qemuRssMaxMib: number;
}

/** Samples the host (event-loop lag, a host `true`'s start-to-exit time, QEMU's RSS) until stopped. */
function watchHost(qemuPids: () => number[]): { stop(): Promise<HostSample> } {
  const lag = monitorEventLoopDelay({ resolution: 10 });
  lag.enable();
  const spawnMs: number[] = [];
  let rssMax = 0;
  let running = true;
  const loop = (async () => {
    while (running) {
      const t0 = performance.now();
      await execFileP("true");
      spawnMs.push(performance.now() - t0);
      for (const pid of qemuPids()) rssMax = Math.max(rssMax, qemuRssMib(pid));
      await sleep(100);
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      lag.disable();
      return {
        lagP99Ms: lag.percentile(99) / 1e6,
        lagMaxMs: lag.max / 1e6,
        spawnMaxMs: Math.max(...spawnMs),
        spawns: spawnMs.length,
        qemuRssMaxMib: rssMax,
      };
    },
  };
}

function qemuRssMib(pid: number): number {
  try {
    const kb = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1];
    return kb ? Number(kb) / 1024 : 0;
  } catch {
    return 0; // gone
  }
}

function expectHostFine(s: HostSample, memoryMib: number): void {
  expect(s.spawns).toBeGreaterThan(0);
  expect(s.lagP99Ms, `event-loop lag p99 ${s.lagP99Ms.toFixed(0)} ms`).toBeLessThan(MAX_LAG_P99_MS);
  expect(s.spawnMaxMs, `slowest host spawn ${s.spawnMaxMs.toFixed(0)} ms`).toBeLessThan(MAX_HOST_SPAWN_MS);
  expect(s.qemuRssMaxMib, `QEMU RSS ${s.qemuRssMaxMib.toFixed(0)} MiB`).toBeLessThan(memoryMib + QEMU_OVERHEAD_MIB);
}

/** How long the guest takes to answer a trivial exec (ms, host clock). */
async function execLatency(vm: Vm): Promise<number> {
  const t0 = performance.now();
  const r = await vm.exec({ argv: ["echo", "ok"], timeoutMs: 30_000 });
  expect(r.stdout.toString()).toBe("ok\n");
  return performance.now() - t0;
}

let image: Image;
let pool: Pool;
const MEMORY_MIB = 256;

beforeAll(async () => {
  image = await Image.build({ ref: "builtin:busybox" });
  // restoreOnRelease: false, so a released VM comes back as it was left (minus its leftovers).
  pool = await image.pool({ min: 1, max: 2, restoreOnRelease: false, acquireTimeoutMs: 120_000 });
});
afterAll(async () => {
  await pool?.shutdown();
});

/** Runs `attack` on a VM of the pool while watching the host, then checks the host and the VM. */
async function underAttack(attack: (vm: Vm) => Promise<void>): Promise<void> {
  const vm = await pool.acquire();
  const host = watchHost(() => [vm.pid]);
  try {
    await attack(vm);
  } finally {
    const s = await host.stop();
    if (vm.machine.alive) await vm.release();
    expectHostFine(s, MEMORY_MIB);
  }
}

describe("a hostile guest", () => {
  it("fork bomb in the foreground: limited, killed at its timeout within a second, the VM answers at once", async () => {
    await underAttack(async (vm) => {
      const timeoutMs = 5_000;
      const t0 = performance.now();
      // The bomb runs in the background of a main process that outlives the deadline (a `wait`
      // would return as soon as the first pipeline's subshells had forked theirs).
      const r = await vm.exec({ argv: ["sh", "-c", "f() { f | f & }; f; exec sleep 3600"], timeoutMs });
      const took = performance.now() - t0;
      expect(r).toMatchObject({ timedOut: true, exitCode: -1, signal: "SIGKILL", pidsLimited: true });
      expect(took - timeoutMs, `returned ${(took - timeoutMs).toFixed(0)} ms after the deadline`).toBeLessThan(1_000);
      expect(await execLatency(vm)).toBeLessThan(2_000);
      expect(await vm.listBackground()).toEqual([]);
      // Every process of the bomb got SIGKILL; hundreds of exits take a moment under emulation.
      const count = async () => Number((await vm.exec({ argv: ["sh", "-c", "ls -d /proc/[0-9]* | wc -l"] })).stdout.toString());
      const t1 = performance.now();
      let procs = await count();
      while (procs >= 50 && performance.now() - t1 < 10_000) {
        await sleep(200);
        procs = await count();
      }
      console.log(`fork bomb: overshoot ${(took - timeoutMs).toFixed(0)} ms; ${procs} processes ${(performance.now() - t1).toFixed(0)} ms later`);
      expect(procs).toBeLessThan(50);
    });
  });

  it("fork bomb left in the background: the exec returns, the bomb stays within its limit, the agent keeps serving, release kills it", async () => {
    await underAttack(async (vm) => {
      const r = await vm.exec({ argv: ["sh", "-c", "f() { f | f & }; f"], limits: { processes: 200 } });
      expect(r.exitCode).toBe(0);
      await sleep(2_000);
      const [bomb] = await vm.listBackground();
      expect(bomb?.argv).toEqual(["sh", "-c", "f() { f | f & }; f"]);
      expect(bomb!.pids.length).toBeGreaterThan(20);
      expect(bomb!.pids.length).toBeLessThanOrEqual(200);
      // Other execs get the CPU and the process table they need.
      const lat: number[] = [];
      for (let i = 0; i < 5; i++) lat.push(await execLatency(vm));
      expect(Math.max(...lat), `exec latencies ${lat.map((x) => x.toFixed(0)).join(", ")} ms`).toBeLessThan(5_000);
      expect((await vm.exec({ argv: ["sh", "-c", "sleep 0 & wait; echo forked"] })).stdout.toString()).toBe("forked\n");
    });
    // The pool handed the VM on after killing the bomb.
    const vm = await pool.acquire();
    try {
      for (let i = 0; i < 50 && (await vm.listBackground()).length > 0; i++) await sleep(100);
      expect(await vm.listBackground()).toEqual([]);
      expect(await execLatency(vm)).toBeLessThan(2_000);
    } finally {
      await vm.release();
    }
  });

  it("memory hog: the OOM killer ends the exec (reported), never the agent; the VM goes on", async () => {
    await underAttack(async (vm) => {
      // No explicit limit: the default keeps a reserve of the VM's memory for the agent and kernel.
      const r = await vm.exec({ argv: ["awk", 'BEGIN { s = "xxxxxxxx"; while (1) s = s s }'], timeoutMs: 60_000 });
      expect(r).toMatchObject({ oomKilled: true, signal: "SIGKILL", timedOut: false });
      expect(await execLatency(vm)).toBeLessThan(2_000);
      expect((await vm.readFile("/proc/1/oom_score_adj")).toString()).toBe("-1000\n");
    });
  });

  it("tmpfs fill: every writable tmpfs filled at once hits the exec's limits, not the agent's memory", async () => {
    await underAttack(async (vm) => {
      // /tmp (the root's writable layer), /dev/shm and /run are each half the VM's memory: all
      // three together are more than the VM has. The execs' memory limit stops them first.
      const r = await vm.exec({
        argv: ["sh", "-c", "for d in /tmp /dev/shm /run; do dd if=/dev/zero of=$d/fill bs=1M 2>/dev/null; done; echo survived"],
        timeoutMs: 120_000,
      });
      expect(r.timedOut).toBe(false);
      // Either the OOM killer ended it, or every file system said ENOSPC first.
      if (!r.oomKilled) expect(r.stdout.toString()).toBe("survived\n");
      expect(await execLatency(vm)).toBeLessThan(5_000);
      // The files stay (they are the guest's) and the agent still moves data: a write to a full
      // file system is refused cleanly, and removing the files frees the space.
      expect((await vm.readFile("/proc/1/oom_score_adj")).toString()).toBe("-1000\n");
      const full = (await vm.exec({ argv: ["sh", "-c", "df -k /tmp | tail -1"] })).stdout.toString();
      const write = vm.writeFile("/tmp/after", Buffer.alloc(4 << 20));
      if (/\s100%\s/.test(full)) await expect(write).rejects.toThrow(/No space left on device/);
      else await write;
      await vm.exec({ argv: ["rm", "-f", "/tmp/fill", "/dev/shm/fill", "/run/fill", "/tmp/after"] });
      await vm.writeFile("/root/after", "still writable");
      expect((await vm.exec({ argv: ["sh", "-c", "head -c 20000000 /dev/zero > /tmp/again && echo wrote"] })).stdout.toString()).toBe("wrote\n");
      await vm.exec({ argv: ["rm", "-f", "/tmp/again", "/root/after"] });
    });
  });

  it("spin on every vCPU: the agent answers, a timeout returns within a second of its deadline", async () => {
    const pool2 = await image.pool({ min: 1, max: 1, vcpus: 2 });
    const vm = await pool2.acquire();
    const host = watchHost(() => [vm.pid]);
    try {
      const timeoutMs = 6_000;
      const t0 = performance.now();
      const spin = vm.exec({ argv: ["sh", "-c", "spin() { while :; do :; done; }; spin & spin & spin & spin & wait"], timeoutMs });
      await sleep(1_500);
      const pings: number[] = [];
      for (let i = 0; i < 5; i++) pings.push(await vm.machine.agent.ping());
      expect(Math.max(...pings), `pings ${pings.map((p) => p.toFixed(0)).join(", ")} ms`).toBeLessThan(2_000);
      expect(await execLatency(vm)).toBeLessThan(5_000);
      const r = await spin;
      const took = performance.now() - t0;
      expect(r).toMatchObject({ timedOut: true, signal: "SIGKILL" });
      expect(took - timeoutMs).toBeLessThan(1_000);
      expect(await execLatency(vm)).toBeLessThan(2_000);
      await vm.release();
    } finally {
      const s = await host.stop();
      await pool2.shutdown();
      expectHostFine(s, MEMORY_MIB);
    }
  });

  it("stdout flood nobody reads: held in the guest by flow control; host memory flat; other calls served", async () => {
    await underAttack(async (vm) => {
      global.gc?.();
      const rss0 = process.memoryUsage().rss;
      const child = await vm.spawn({ argv: ["sh", "-c", "while :; do cat /proc/1/maps; done"] });
      await sleep(5_000);
      // Calls on the same VM (the same channel) are not held up by the unread stream.
      expect(await execLatency(vm)).toBeLessThan(5_000);
      expect((await vm.readFile("/proc/1/oom_score_adj")).toString()).toBe("-1000\n");
      global.gc?.();
      const growth = (process.memoryUsage().rss - rss0) / 2 ** 20;
      expect(growth, `host RSS grew ${growth.toFixed(1)} MiB`).toBeLessThan(64);
      // The flooder is stopped, not done: the guest holds it in its pipe.
      expect(child.exited).toBe(false);
      await child.signal("SIGKILL");
      child.stdout.resume();
      child.stderr.resume();
      expect((await child.wait()).signal).toBe("SIGKILL");
    });
  });

  it("garbage at the agent's ports: a guest process cannot open them, cannot signal the agent; host-side garbage ends only that connection", async () => {
    await underAttack(async (vm) => {
      const script = [
        "for p in /sys/class/virtio-ports/*; do",
        '  dev=/dev/$(basename $p); name=$(cat $p/name)',
        '  if printf "\\377\\377\\377\\377garbage" > $dev 2>/dev/null; then echo "$name writable"; else echo "$name busy"; fi',
        "done",
        "kill -STOP 1; kill -KILL 1; kill -SEGV 1; echo signalled",
      ].join("\n");
      const r = await vm.exec({ argv: ["sh", "-c", script] });
      expect(r.stdout.toString().split("\n").filter(Boolean).sort()).toEqual(["signalled", "supermachine.0 busy", "supermachine.1 busy"]);
      expect(await execLatency(vm)).toBeLessThan(2_000);
      // The exec port from the host: garbage gets GOAWAY and the socket closes; the primary
      // connection is untouched, and the next client of the exec port is served.
      const got = await new Promise<Buffer>((resolve, reject) => {
        const s = connect(vm.execPath);
        const parts: Buffer[] = [];
        s.on("connect", () => s.write(Buffer.concat([Buffer.from([0xff, 0xff, 0xff, 0x7f, 0x01, 0, 0, 0, 0, 0, 0, 0]), Buffer.alloc(64, 0xaa)])));
        s.on("data", (d) => parts.push(d));
        s.on("error", reject);
        setTimeout(() => {
          s.destroy();
          resolve(Buffer.concat(parts));
        }, 3_000);
      });
      // A header announcing 2 GiB cannot be framed: GOAWAY (0x06), even before HELLO.
      expect(got.length).toBeGreaterThanOrEqual(12);
      expect(got.readUInt8(4)).toBe(0x06);
      expect(await execLatency(vm)).toBeLessThan(2_000);
      const socket = connect(vm.execPath);
      await new Promise((resolve, reject) => socket.once("connect", resolve).once("error", reject));
      const client = new AgentClient(socket);
      try {
        expect((await client.hello({ timeoutMs: 10_000 })).port).toBe("supermachine.1");
        expect((await client.exec({ argv: ["echo", "next client"], env: ["PATH=/bin"] }).wait()).exitCode).toBe(0);
      } finally {
        client.close();
      }
    });
  });

  it("a guest that reboots itself dies alone: the pool replaces it and other acquires are served", async () => {
    const a = await pool.acquire();
    const b = await pool.acquire();
    const host = watchHost(() => [a.pid, b.pid]);
    try {
      await expect(a.exec({ argv: ["reboot", "-f"], timeoutMs: 10_000 })).rejects.toMatchObject({ code: "VM_DEAD" });
      expect(await execLatency(b)).toBeLessThan(2_000);
      await a.release();
      const c = await pool.acquire();
      expect(c.pid).not.toBe(a.pid);
      expect(await execLatency(c)).toBeLessThan(5_000);
      await c.release();
      await b.release();
    } finally {
      expectHostFine(await host.stop(), MEMORY_MIB);
    }
  });
});
