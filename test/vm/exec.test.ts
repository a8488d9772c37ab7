// Real microVMs (TCG on these machines): the built-in busybox image, booted by the engine,
// driven through the public API.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Image, type Pool, type Vm } from "../../src/index.js";
import { isRunning, waitFor } from "../helpers/vm.js";

let image: Image;
let pool: Pool;
let vm: Vm;

beforeAll(async () => {
  image = await Image.build({ ref: "builtin:busybox" });
  pool = await image.pool({ min: 1, max: 2 });
  vm = await pool.acquire();
});

afterAll(async () => {
  await pool?.shutdown();
});

describe("exec on a busybox microVM", () => {
  it("runs commands and returns their output and exit codes", async () => {
    const hello = await vm.exec({ argv: ["echo", "hello from supermachine"] });
    expect(hello).toMatchObject({ stdout: Buffer.from("hello from supermachine\n"), stderr: Buffer.alloc(0), exitCode: 0, timedOut: false, signal: null });
    expect(hello.durationMs).toBeGreaterThan(0);
    expect(hello.durationMs).toBeLessThan(5_000);

    const uname = await vm.exec({ argv: ["uname", "-sm"] });
    expect(uname.stdout.toString()).toBe("Linux x86_64\n");

    const both = await vm.exec({ argv: ["sh", "-c", "echo out; echo err >&2; exit 3"] });
    expect(both.stdout.toString()).toBe("out\n");
    expect(both.stderr.toString()).toBe("err\n");
    expect(both.exitCode).toBe(3);

    const f = await vm.exec({ argv: ["false"] });
    expect(f.exitCode).toBe(1);
  });

  it("boots from the image's squashfs under a writable overlay", async () => {
    const r = await vm.exec({ argv: ["sh", "-c", "grep -E ' / ' /proc/mounts; echo x > /etc/written && cat /etc/written"] });
    expect(r.stdout.toString()).toMatch(/^overlay \/ overlay/m);
    expect(r.stdout.toString()).toMatch(/^x$/m);
    expect(r.exitCode).toBe(0);
  });

  it("merges env over the image env and honours cwd", async () => {
    const r = await vm.exec({
      argv: ["sh", "-c", 'echo "$GREETING|$PATH|$(pwd)"'],
      env: { GREETING: "hi there" },
      cwd: "/tmp",
    });
    expect(r.stdout.toString()).toBe("hi there|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|/tmp\n");
    const root = await vm.exec({ argv: ["pwd"] });
    expect(root.stdout.toString()).toBe("/\n");
  });

  it("returns 127 with a message when argv[0] does not exist, and the VM stays usable", async () => {
    const r = await vm.exec({ argv: ["no-such-command", "x"] });
    expect(r.exitCode).toBe(127);
    expect(r.stderr.toString()).toContain("no-such-command");
    expect((await vm.exec({ argv: ["echo", "still here"] })).stdout.toString()).toBe("still here\n");
  });

  it("kills the whole process group on timeout, reports -1, and the VM stays usable", async () => {
    const t0 = Date.now();
    const r = await vm.exec({
      argv: ["sh", "-c", "sleep 30 & echo $! > /tmp/bg.pid; echo started; sleep 30"],
      timeoutMs: 1_500,
    });
    expect(r).toMatchObject({ exitCode: -1, timedOut: true, signal: "SIGKILL" });
    expect(r.stdout.toString()).toBe("started\n");
    expect(Date.now() - t0).toBeLessThan(10_000);
    // The background sleep was in the same process group: it is gone too.
    const check = await vm.exec({ argv: ["sh", "-c", 'kill -0 "$(cat /tmp/bg.pid)" 2>/dev/null && echo alive || echo gone'] });
    expect(check.stdout.toString()).toBe("gone\n");
  });

  it("writes staged files before the process starts, with their modes", async () => {
    const r = await vm.exec({
      argv: ["sh", "-c", "cat /work/in.txt; /work/run.sh; stat -c %a /work/in.txt /work/run.sh"],
      stageFiles: { "/work/in.txt": Buffer.from("staged\n") },
      stageFilesMode: [{ path: "/work/run.sh", bytes: Buffer.from("#!/bin/sh\necho script ran\n"), mode: 0o755 }],
    });
    expect(r.stdout.toString()).toBe("staged\nscript ran\n644\n755\n");
  });

  it("tells a kill by signal from an exit and from a timeout", async () => {
    const killed = await vm.exec({ argv: ["sh", "-c", "kill -TERM $$; sleep 5"] });
    expect(killed).toMatchObject({ exitCode: -1, timedOut: false, signal: "SIGTERM" });
    const exited = await vm.exec({ argv: ["sh", "-c", "exit 7"] });
    expect(exited).toMatchObject({ exitCode: 7, timedOut: false, signal: null });
  });

  it("runs chain only after a zero exit, in one round trip", async () => {
    const agent = vm.machine.agent;
    const sent: number[] = [];
    const orig = agent.exec.bind(agent);
    agent.exec = (req, opts) => (sent.push(req.argv.length), orig(req, opts));
    try {
      const ok = await vm.exec({ argv: ["sh", "-c", "echo first; echo e1 >&2"], chain: ["sh", "-c", "echo second; exit 4"] });
      expect(ok.stdout.toString()).toBe("first\nsecond\n");
      expect(ok.stderr.toString()).toBe("e1\n");
      expect(ok.exitCode).toBe(4);
      const skipped = await vm.exec({ argv: ["sh", "-c", "echo only; exit 3"], chain: ["echo", "never"] });
      expect(skipped.stdout.toString()).toBe("only\n");
      expect(skipped.exitCode).toBe(3);
      const missing = await vm.exec({ argv: ["true"], chain: ["no-such-chained-cmd"] });
      expect(missing.exitCode).toBe(127);
      expect(missing.stderr.toString()).toContain("no-such-chained-cmd");
      // Each exec, chain included, was one EXEC request.
      expect(sent).toEqual([3, 3, 1]);
    } finally {
      agent.exec = orig;
    }
  });

  it("runs on a terminal with tty: stdout and stderr merged, the size as asked", async () => {
    const r = await vm.exec({ argv: ["sh", "-c", "tty; stty size; echo to-stderr >&2"], tty: true, winsize: { cols: 123, rows: 45 } });
    const text = r.stdout.toString();
    expect(text).toMatch(/^\/dev\/pts\/\d+\r\n45 123\r\nto-stderr\r\n$/);
    expect(r.stderr.length).toBe(0);
    expect(r.exitCode).toBe(0);
    const plain = await vm.exec({ argv: ["sh", "-c", "tty"] });
    expect(plain.stdout.toString()).toBe("not a tty\n");
  });

  it("runs many execs concurrently on one VM", async () => {
    const results = await Promise.all(
      Array.from({ length: 12 }, (_, i) => vm.exec({ argv: ["sh", "-c", `sleep 0.$((${i} % 3)); echo ${i}`] })),
    );
    expect(results.map((r) => r.stdout.toString())).toEqual(Array.from({ length: 12 }, (_, i) => `${i}\n`));
  });

  it("moves large output through flow control intact", async () => {
    const r = await vm.exec({ argv: ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' a"] });
    expect(r.stdout.length).toBe(3_000_000);
    expect(r.stdout.every((b) => b === 0x61)).toBe(true);
  });

  it("writes and reads files", async () => {
    const data = Buffer.from(Array.from({ length: 300_000 }, (_, i) => i % 251));
    await vm.writeFile("/data/blob.bin", data);
    expect((await vm.readFile("/data/blob.bin")).equals(data)).toBe(true);
    await expect(vm.readFile("/data/missing")).rejects.toThrow(/missing/);
  });

  it("supports AbortSignal", async () => {
    const ac = new AbortController();
    const p = vm.exec({ argv: ["sleep", "30"], signal: ac.signal });
    setTimeout(() => ac.abort(new Error("stop it")), 300);
    await expect(p).rejects.toThrow("stop it");
    expect((await vm.exec({ argv: ["true"] })).exitCode).toBe(0);
  });

  it("gives the guest the host's wall clock", async () => {
    const r = await vm.exec({ argv: ["date", "+%s"] });
    expect(Math.abs(Number(r.stdout.toString()) - Date.now() / 1000)).toBeLessThan(5);
  });

  it("sends an exec's STARTED with its first output, and a spawn's at once (issue 22)", async () => {
    // Frame arrival times on the host, by type, for one stream.
    const agent = vm.machine.agent as unknown as { onFrame(f: { type: number; stream: number }): void };
    const orig = agent.onFrame.bind(agent);
    const arrivals: { type: number; at: number }[] = [];
    agent.onFrame = (f) => {
      arrivals.push({ type: f.type, at: performance.now() });
      orig(f);
    };
    const STARTED = 0x11;
    const DATA = 0x12;
    try {
      // vm.exec: nobody waits for STARTED, so it leaves with the output 300 ms later.
      let t0 = performance.now();
      const r = await vm.exec({ argv: ["sh", "-c", "sleep 0.3; echo late"] });
      expect(r.stdout.toString()).toBe("late\n");
      const started = arrivals.find((a) => a.type === STARTED)!;
      const data = arrivals.find((a) => a.type === DATA)!;
      expect(started.at - t0).toBeGreaterThan(250);
      expect(arrivals.indexOf(started)).toBeLessThan(arrivals.indexOf(data));
      expect(data.at - started.at).toBeLessThan(50);
      // vm.spawn resolves on STARTED (with the pid): it comes long before the output.
      t0 = performance.now();
      const child = await vm.spawn({ argv: ["sh", "-c", "sleep 0.3; echo late"] });
      const spawned = performance.now() - t0;
      expect(child.pid).toBeGreaterThan(1);
      expect(spawned).toBeLessThan(250);
      await child.wait();
    } finally {
      agent.onFrame = orig;
    }
  });
});

describe("pools", () => {
  it("runs two VMs at once, and shutdown kills every QEMU process", async () => {
    const p = await image.pool({ min: 0, max: 2 });
    const [a, b] = await Promise.all([p.acquire(), p.acquire()]);
    expect(a.pid).not.toBe(b.pid);
    expect(p.stats()).toMatchObject({ alive: 2, inUse: 2, idle: 0, waiting: 0, min: 0, max: 2 });
    const [ra, rb] = await Promise.all([a.exec({ argv: ["hostname"] }), b.exec({ argv: ["echo", "b"] })]);
    expect(ra.exitCode).toBe(0);
    expect(rb.stdout.toString()).toBe("b\n");
    expect(isRunning(a.pid) && isRunning(b.pid)).toBe(true);
    await p.shutdown();
    expect(await waitFor(() => !isRunning(a.pid) && !isRunning(b.pid), 3_000)).toBe(true);
    await expect(p.acquire()).rejects.toMatchObject({ code: "POOL_SHUT_DOWN" });
    await expect(a.exec({ argv: ["true"] })).rejects.toMatchObject({ code: "VM_DEAD" });
  });

  it("gives a clean VM after release by default, and the same one with restoreOnRelease false", async () => {
    const clean = await image.pool({ min: 1, max: 1 });
    const v1 = await clean.acquire();
    await v1.exec({ argv: ["touch", "/tmp/marker"] });
    await v1.release();
    await expect(v1.exec({ argv: ["true"] })).rejects.toMatchObject({ code: "VM_RELEASED" });
    const v2 = await clean.acquire();
    expect((await v2.exec({ argv: ["ls", "/tmp/marker"] })).exitCode).not.toBe(0);
    await clean.shutdown();

    const dirty = await image.pool({ min: 1, max: 1, restoreOnRelease: false });
    const d1 = await dirty.acquire();
    await d1.exec({ argv: ["touch", "/tmp/marker"] });
    await d1.release();
    const d2 = await dirty.acquire();
    expect((await d2.exec({ argv: ["ls", "/tmp/marker"] })).exitCode).toBe(0);
    await dirty.shutdown();
  });

  it("times out acquire when the pool is saturated, and serves waiters in order", async () => {
    const p = await image.pool({ min: 1, max: 1, restoreOnRelease: false, acquireTimeoutMs: 5_000 });
    const held = await p.acquire();
    const quick = await image.pool({ min: 1, max: 1, acquireTimeoutMs: 400 });
    const busy = await quick.acquire();
    await expect(quick.acquire()).rejects.toMatchObject({ code: "POOL_ACQUIRE_TIMEOUT" });
    await busy.release();
    await quick.shutdown();
    const order: number[] = [];
    const waiters = [1, 2, 3].map((n) => p.acquire().then((v) => (order.push(n), v)));
    expect(p.stats().waiting).toBe(3);
    await held.release();
    for (const w of waiters) await (await w).release();
    expect(order).toEqual([1, 2, 3]);
    await p.shutdown();
  });

  it("waits without limit with acquireTimeoutMs 0, and shutdown rejects waiters", async () => {
    const p = await image.pool({ min: 1, max: 1, restoreOnRelease: false, acquireTimeoutMs: 0 });
    const held = await p.acquire();
    let settled = false;
    const waiting = p.acquire().finally(() => (settled = true));
    await new Promise((r) => setTimeout(r, 500));
    expect(settled).toBe(false);
    await held.release();
    await (await waiting).release();
    await p.acquire();
    const rejected = p.acquire().catch((e: unknown) => e);
    await p.shutdown();
    expect(await rejected).toMatchObject({ code: "POOL_SHUT_DOWN" });
  });

  it("reports a VM whose QEMU process died, and serves a fresh one after release", async () => {
    const p = await image.pool({ min: 1, max: 1 });
    const v = await p.acquire();
    const pending = v.exec({ argv: ["sleep", "30"] });
    await new Promise((r) => setTimeout(r, 200));
    process.kill(v.pid, "SIGKILL");
    await expect(pending).rejects.toMatchObject({ code: "VM_DEAD" });
    await expect(v.exec({ argv: ["true"] })).rejects.toMatchObject({ code: "VM_DEAD" });
    await v.release();
    const fresh = await p.acquire();
    expect(fresh.pid).not.toBe(v.pid);
    expect((await fresh.exec({ argv: ["echo", "ok"] })).stdout.toString()).toBe("ok\n");
    await p.shutdown();
  });

  it("supports await using", async () => {
    const p = await image.pool({ min: 1, max: 1, restoreOnRelease: false });
    {
      await using v = await p.acquire();
      expect((await v.exec({ argv: ["true"] })).exitCode).toBe(0);
      expect(p.stats().inUse).toBe(1);
    }
    expect(p.stats()).toMatchObject({ inUse: 0, idle: 1 });
    await p.shutdown();
  });
});
