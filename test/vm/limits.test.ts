// Limits inside the guest on real microVMs: every exec and spawn runs in a cgroup of its own
// with a process and a memory limit (defaults sized from the VM; image, pool and call options
// change them), its timeout kills the whole cgroup, memory-limit kills are reported, and
// processes an exec leaves running are listed and killed at release unless detached.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { Image, OptionError, type Vm } from "../../src/index.js";
import { useBusyboxVm } from "../helpers/vm.js";

const env = useBusyboxVm({ min: 1, max: 1 });
const snapshotsDir = mkdtempSync(join(tmpdir(), "sm-limits-"));
afterAll(() => rmSync(snapshotsDir, { recursive: true, force: true }));

/** The exec's cgroup as its own process sees it, e.g. "/exec/12". */
async function cgroupOf(vm: Vm, options: Parameters<Vm["exec"]>[0] = { argv: ["cat", "/proc/self/cgroup"] }): Promise<string> {
  const out = (await vm.exec(options)).stdout.toString().trim();
  expect(out).toMatch(/^0::\/exec\/\d+$/);
  return out.slice(3);
}

async function read(vm: Vm, path: string): Promise<string> {
  return (await vm.readFile(path)).toString().trim();
}

/** Waits (up to 5 s) until no `sleep` runs in the guest. */
async function noSleepLeft(vm: Vm): Promise<boolean> {
  for (let i = 0; i < 50; i++) {
    if ((await vm.exec({ argv: ["sh", "-c", "pidof sleep || echo none"] })).stdout.toString() === "none\n") return true;
    await new Promise((r) => setTimeout(r, 100));
  }
  return false;
}

/** Limits an exec sees in its own cgroup. */
async function ownLimits(vm: Vm, limits?: { processes?: number; memoryMib?: number }): Promise<{ pids: string; memory: string }> {
  const r = await vm.exec({ argv: ["sh", "-c", 'd=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); cat $d/pids.max $d/memory.max'], ...(limits ? { limits } : {}) });
  const [pids, memory] = r.stdout.toString().trim().split("\n") as [string, string];
  return { pids, memory };
}

describe("cgroups in the guest", () => {
  it("puts the agent in its own weighted cgroup, out of the OOM killer's reach, and each exec in a cgroup of its own", async () => {
    const vm = env.vm;
    expect(await read(vm, "/proc/1/cgroup")).toBe("0::/agent");
    expect(await read(vm, "/proc/1/oom_score_adj")).toBe("-1000");
    expect(await read(vm, "/sys/fs/cgroup/agent/cpu.weight")).toBe("10000");
    expect((await read(vm, "/sys/fs/cgroup/cgroup.subtree_control")).split(" ").sort()).toEqual(["cpu", "memory", "pids"]);
    // Children do not inherit the agent's protection.
    expect((await vm.exec({ argv: ["cat", "/proc/self/cgroup", "/proc/self/oom_score_adj"] })).stdout.toString()).toMatch(/^0::\/exec\/\d+\n0\n$/);
    // Execs running at once are in different cgroups; an idle one is reused, so they do not pile up.
    const running = await vm.spawn({ argv: ["sh", "-c", "cat /proc/self/cgroup; read x"] });
    const first = (await running.readStdout()).toString().trim();
    const other = await cgroupOf(vm);
    expect(other).not.toBe(first.slice(3));
    await running.closeStdin();
    await running.wait();
    for (let i = 0; i < 20; i++) await cgroupOf(vm);
    const groups = (await vm.exec({ argv: ["sh", "-c", "ls -d /sys/fs/cgroup/exec/*/ | wc -l"] })).stdout.toString();
    expect(Number(groups)).toBeLessThanOrEqual(9);
  });

  it("sizes the defaults from the VM: memory less a reserve, a quarter of threads-max", async () => {
    const vm = env.vm;
    const memTotal = Number(/MemTotal:\s+(\d+) kB/.exec(await read(vm, "/proc/meminfo"))![1]) * 1024;
    const threadsMax = Number(await read(vm, "/proc/sys/kernel/threads-max"));
    const reserve = Math.min(Math.max(Math.floor(memTotal / 8), 16 << 20), 128 << 20);
    const budget = Math.floor((memTotal - reserve) / 4096) * 4096;
    const own = await ownLimits(vm);
    expect(Number(own.memory)).toBe(budget);
    expect(Number(own.pids)).toBe(Math.max(Math.floor(threadsMax / 4), 64));
    // All execs together stay below the VM's memory and process table.
    expect(Number(await read(vm, "/sys/fs/cgroup/exec/memory.max"))).toBe(budget);
    expect(Number(await read(vm, "/sys/fs/cgroup/exec/pids.max"))).toBe(threadsMax - Math.max(64, Math.floor(threadsMax / 16)));
    // The agent announced the same defaults when the host connected.
    expect(vm.machine.hello.features).toContain("limits");
    expect(vm.machine.hello.limits).toEqual({ pidsMax: Number(own.pids), memoryMaxBytes: Number(own.memory) });
  });

  it("takes per-call limits, and refuses bad ones before anything reaches the guest", async () => {
    const vm = env.vm;
    expect(await ownLimits(vm, { processes: 20, memoryMib: 48 })).toEqual({ pids: "20", memory: String(48 << 20) });
    await expect(vm.exec({ argv: ["true"], limits: { processes: 0 } })).rejects.toBeInstanceOf(OptionError);
    await expect(vm.exec({ argv: ["true"], limits: { memoryMib: 1.5 } })).rejects.toThrow(/limits\.memoryMib/);
    await expect(vm.exec({ argv: ["true"], limits: { cpus: 2 } as never })).rejects.toThrow(/cpus/);
  });

  it("limits processes: forks past the limit fail and the exit says so", async () => {
    // busybox sh gives up at the first fork that fails: the sleeps started by then are left.
    const argv = ["sh", "-c", "for i in $(seq 30); do sleep 30 & done 2>/dev/null"];
    const r = await env.vm.exec({ argv, limits: { processes: 10 }, timeoutMs: 20_000 });
    expect(r.pidsLimited).toBe(true);
    expect(r.oomKilled).toBe(false);
    const [left] = (await env.vm.listBackground()).filter((e) => e.argv.join(" ") === argv.join(" "));
    // At most 10 at once: the shell (or the $(seq) subshell) and at most 9 sleeps.
    expect(left!.pids.length).toBeGreaterThan(0);
    expect(left!.pids.length).toBeLessThanOrEqual(9);
    expect(await env.vm.killBackground({ id: left!.id })).toBe(1);
    expect(await noSleepLeft(env.vm)).toBe(true);
    const ok = await env.vm.exec({ argv: ["sh", "-c", "sleep 0 & wait; echo fine"] });
    expect(ok).toMatchObject({ exitCode: 0, pidsLimited: false });
  });

  it("reports a memory-limit kill as oomKilled, and the VM goes on", async () => {
    const t0 = Date.now();
    const r = await env.vm.exec({ argv: ["awk", 'BEGIN { s = "xxxxxxxx"; while (1) s = s s }'], limits: { memoryMib: 24 }, timeoutMs: 60_000 });
    expect(r).toMatchObject({ exitCode: -1, signal: "SIGKILL", timedOut: false, oomKilled: true });
    expect(Date.now() - t0).toBeLessThan(30_000);
    expect((await env.vm.exec({ argv: ["echo", "alive"] })).stdout.toString()).toBe("alive\n");
    // A kill by signal is not an OOM kill.
    expect(await env.vm.exec({ argv: ["sh", "-c", "kill -KILL $$"] })).toMatchObject({ signal: "SIGKILL", oomKilled: false });
  });

  it("kills the whole cgroup on timeout, even what left the process group", async () => {
    const t0 = Date.now();
    const r = await env.vm.exec({
      argv: ["sh", "-c", "setsid sh -c 'echo $$ > /tmp/escapee.pid; exec sleep 300' & sleep 300"],
      timeoutMs: 1_500,
    });
    expect(r).toMatchObject({ exitCode: -1, timedOut: true, signal: "SIGKILL" });
    expect(Date.now() - t0).toBeLessThan(10_000);
    const check = await env.vm.exec({ argv: ["sh", "-c", 'kill -0 "$(cat /tmp/escapee.pid)" 2>/dev/null && echo alive || echo gone'] });
    expect(check.stdout.toString()).toBe("gone\n");
    // Killed, so not listed as left running.
    expect((await env.vm.listBackground()).filter((e) => e.argv.join(" ").includes("escapee"))).toEqual([]);
  });

  it("runs a chain's two commands in one cgroup, and a spawn in its own (child.execId names its leftovers)", async () => {
    const r = await env.vm.exec({ argv: ["cat", "/proc/self/cgroup"], chain: ["cat", "/proc/self/cgroup"] });
    const [first, second] = r.stdout.toString().trim().split("\n");
    expect(first).toMatch(/^0::\/exec\/\d+$/);
    expect(second).toBe(first);
    const child = await env.vm.spawn({ argv: ["sh", "-c", "sleep 300 & echo $!"] });
    const out: Buffer[] = [];
    for await (const c of child.stdout) out.push(c as Buffer);
    await child.wait();
    const [entry] = await env.vm.listBackground();
    expect(entry).toMatchObject({ id: child.execId, pids: [Number(Buffer.concat(out).toString())] });
    expect(await env.vm.killBackground({ id: child.execId! })).toBe(1);
    expect(await noSleepLeft(env.vm)).toBe(true);
  });
});

describe("processes an exec leaves running", () => {
  it("are listed with the exec's id, argv and pids, and killed by id", async () => {
    const vm = env.vm;
    const r = await vm.exec({ argv: ["sh", "-c", "sleep 300 & sleep 301 & echo started"] });
    expect(r.stdout.toString()).toBe("started\n");
    const list = await vm.listBackground();
    expect(list).toHaveLength(1);
    const [entry] = list;
    expect(entry).toMatchObject({ argv: ["sh", "-c", "sleep 300 & sleep 301 & echo started"], detached: false });
    expect(entry!.pids).toHaveLength(2);
    // The pids are the two sleeps (once the shell's forks have exec'd them).
    // One line per pid, an empty one included (a process in the middle of its execve has no
    // cmdline yet): trimming the whole output would drop it and end the wait too soon.
    const cmdlines = async (pids: number[]) =>
      (await vm.exec({ argv: ["sh", "-c", pids.map((p) => `tr '\\0' ' ' < /proc/${p}/cmdline; echo`).join(";")] })).stdout.toString().split("\n").slice(0, pids.length).map((c) => c.trim()).sort();
    let seen = await cmdlines(entry!.pids);
    for (let i = 0; i < 50 && seen.some((c) => !c.startsWith("sleep")); i++) {
      await new Promise((r) => setTimeout(r, 100));
      seen = await cmdlines(entry!.pids);
    }
    expect(seen).toEqual(["sleep 300", "sleep 301"]);
    expect(await vm.killBackground({ id: entry!.id })).toBe(1);
    expect(await vm.listBackground()).toEqual([]);
    expect(await noSleepLeft(vm)).toBe(true);
  });

  it("keep their exec's limits, and are forgotten once they end", async () => {
    const vm = env.vm;
    await vm.exec({ argv: ["sh", "-c", "sleep 1 &"], limits: { processes: 7 } });
    const [entry] = await vm.listBackground();
    const r = await vm.exec({ argv: ["sh", "-c", `cat /sys/fs/cgroup$(cut -d: -f3 /proc/${entry!.pids[0]}/cgroup)/pids.max`] });
    expect(r.stdout.toString()).toBe("7\n");
    let left = [entry];
    for (let i = 0; i < 100 && left.length > 0; i++) {
      await new Promise((r) => setTimeout(r, 100));
      left = await vm.listBackground();
    }
    expect(left).toEqual([]);
    // Its cgroup serves later execs, with their own limits.
    expect(await ownLimits(vm)).toEqual({ pids: String(vm.machine.hello.limits!.pidsMax), memory: String(vm.machine.hello.limits!.memoryMaxBytes) });
  });

  it("charge what they hit (OOM, pids.max) after their exec ended to no later exec", async () => {
    const vm = env.vm;
    // Both exec returns at once; what they left hits its limit afterwards.
    const hog = await vm.exec({ argv: ["sh", "-c", `(sleep 0.3; awk 'BEGIN { s = "xxxxxxxx"; while (1) s = s s }') >/dev/null 2>&1 &`], limits: { memoryMib: 24 } });
    expect(hog).toMatchObject({ exitCode: 0, oomKilled: false });
    const forks = await vm.exec({ argv: ["sh", "-c", "(sleep 0.3; for i in $(seq 20); do sleep 1 & done; wait) >/dev/null 2>&1 &"], limits: { processes: 5 } });
    expect(forks).toMatchObject({ exitCode: 0, pidsLimited: false });
    let left = await vm.listBackground();
    for (let i = 0; i < 150 && left.length > 0; i++) {
      await new Promise((r) => setTimeout(r, 100));
      left = await vm.listBackground();
    }
    expect(left).toEqual([]);
    // Their groups are reused by the next execs, which start with clean counts.
    for (let i = 0; i < 10; i++) {
      expect(await vm.exec({ argv: ["true"] })).toMatchObject({ exitCode: 0, oomKilled: false, pidsLimited: false });
    }
  });

  it("are killed at release to a pool that does not restore, unless the exec asked to keep them (detach)", async () => {
    const image = await Image.build({ ref: "builtin:busybox" });
    const pool = await image.pool({ min: 1, max: 1, restoreOnRelease: false });
    try {
      const vm = await pool.acquire();
      const qemu = vm.pid;
      await vm.exec({ argv: ["sh", "-c", "sleep 400 &"] });
      await vm.exec({ argv: ["sh", "-c", "sleep 401 &"], detach: true });
      const child = await vm.spawn({ argv: ["sh", "-c", "sleep 402 & echo bg; exit 0"] });
      await child.wait();
      expect((await vm.listBackground()).map((e) => e.detached).sort()).toEqual([false, false, true]);
      // Everything but the detached one is killed (all: true would take that one too).
      await vm.release();
      const again = await pool.acquire();
      expect(again.pid).toBe(qemu);
      const list = await again.listBackground();
      expect(list).toHaveLength(1);
      expect(list[0]).toMatchObject({ argv: ["sh", "-c", "sleep 401 &"], detached: true });
      // The killed ones are gone within moments (they cannot run again: SIGKILL).
      const sleeps = async () => (await again.exec({ argv: ["sh", "-c", "for p in $(pidof sleep); do tr '\\0' ' ' < /proc/$p/cmdline; echo; done"] })).stdout.toString().trim();
      for (let i = 0; i < 50 && (await sleeps()) !== "sleep 401"; i++) await new Promise((r) => setTimeout(r, 100));
      expect(await sleeps()).toBe("sleep 401");
      expect(await again.killBackground({ detached: true })).toBe(1);
      expect(await again.listBackground()).toEqual([]);
      await again.release();
    } finally {
      await pool.shutdown();
    }
  });
});

describe("limits per image and per pool", () => {
  it("applies the image's execLimits to its warmup and VMs, the pool's over them, a call's over both", async () => {
    const image = await Image.build({
      ref: "builtin:busybox",
      snapshotsDir,
      name: "limited",
      execLimits: { processes: 40, memoryMib: 100 },
      warmup: async (vm) => {
        await vm.exec({ argv: ["sh", "-c", "d=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); cat $d/pids.max > /warmup-pids"] });
      },
    });
    const pool = await image.pool({ min: 1, max: 1, execLimits: { processes: 30 } });
    try {
      const vm = await pool.acquire();
      expect(await read(vm, "/warmup-pids")).toBe("40");
      expect(await ownLimits(vm)).toEqual({ pids: "30", memory: String(100 << 20) });
      expect(await ownLimits(vm, { memoryMib: 50 })).toEqual({ pids: "30", memory: String(50 << 20) });
      await vm.release();
    } finally {
      await pool.shutdown();
    }
    // The limits are part of the key (the warmup ran under them): other limits, another snapshot.
    const other = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "limited-2", execLimits: { processes: 41 } });
    expect(other.inputHash).not.toBe(image.inputHash);
    await other.dropHandoff();
    await expect(Image.build({ ref: "builtin:busybox", execLimits: { processes: -1 } })).rejects.toThrow(/execLimits\.processes/);
  });

  it("runs the workload in a cgroup of its own, without the agent's OOM protection", async () => {
    const image = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "with-workload", cmd: ["sleep", "1000"] });
    const pool = await image.pool({ min: 1, max: 1 });
    try {
      const vm = await pool.acquire();
      const r = await vm.exec({ argv: ["sh", "-c", "p=$(pidof sleep); cat /proc/$p/cgroup /proc/$p/oom_score_adj"] });
      expect(r.stdout.toString()).toBe("0::/workload\n0\n");
      await vm.release();
    } finally {
      await pool.shutdown();
    }
  });
});
