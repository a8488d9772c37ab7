// The unchanged E2B SDK from npm, at four versions (aliased devDependencies), against
// `supermachine serve` on loopback with real microVMs of the built-in busybox image: create,
// streamed command output, exit codes and timeouts, a background process fed through stdin and
// killed, files, listing by metadata, timeouts of the sandbox, kill. The SDK reaches the server
// through E2B_API_URL and E2B_SANDBOX_URL, as docs/serve.md tells users to.
import { existsSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { pausedRoot } from "../../src/server/sandboxes.js";
import { testServer, type TestServer } from "../helpers/serve.js";

const VERSIONS = ["e2b-2.7.0", "e2b-2.14.1", "e2b-2.45.0", "e2b"] as const;

let t: TestServer;
const saved = { ...process.env };

beforeAll(async () => {
  t = await testServer();
  process.env.E2B_API_URL = t.server.url;
  process.env.E2B_SANDBOX_URL = t.server.url;
  process.env.E2B_API_KEY = t.key;
});

afterAll(async () => {
  for (const k of ["E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"]) {
    if (saved[k] === undefined) delete process.env[k];
    else process.env[k] = saved[k];
  }
  await t?.close();
});

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Sdk = any;

describe.each(VERSIONS)("the %s SDK", (pkg) => {
  let sdk: Sdk;
  beforeAll(async () => {
    sdk = await import(pkg);
  });

  it("creates a sandbox and runs commands: streamed output, exit codes, a timeout that kills", async () => {
    const sandbox = await sdk.Sandbox.create("base", { metadata: { suite: pkg }, envs: { GREETING: "hi from the sandbox" } });
    try {
      expect(sandbox.sandboxId).toMatch(/^[a-z0-9]{20}$/);
      const chunks: string[] = [];
      const r = await sandbox.commands.run('echo "$GREETING"; sleep 0.3; echo second; echo oops >&2', { onStdout: (d: string) => chunks.push(d) });
      expect(r.exitCode).toBe(0);
      expect(r.stdout).toBe("hi from the sandbox\nsecond\n");
      expect(r.stderr).toBe("oops\n");
      // Streamed: the first line came on its own, before the sleep ended.
      expect(chunks[0]).toBe("hi from the sandbox\n");
      expect(chunks.length).toBeGreaterThanOrEqual(2);

      const failed = await sandbox.commands.run("echo before; exit 7").catch((e: unknown) => e);
      expect(failed).toBeInstanceOf(sdk.CommandExitError);
      expect(failed.exitCode).toBe(7);
      expect(failed.stdout).toBe("before\n");

      const t0 = Date.now();
      const timedOut = await sandbox.commands.run("sleep 30; echo never", { timeoutMs: 1500 }).catch((e: unknown) => e);
      expect(timedOut).toBeInstanceOf(sdk.TimeoutError);
      expect(Date.now() - t0).toBeLessThan(15_000);
      // The timeout killed the process in the guest too.
      const left = await sandbox.commands.run("ps -o args | grep -c '[s]leep 30' || true");
      expect(left.stdout.trim()).toBe("0");

      const cwd = await sandbox.commands.run("pwd; id -un", { cwd: "/tmp" });
      expect(cwd.stdout).toBe("/tmp\nroot\n");
      const nobody = await sandbox.commands.run("id -un", { user: "nobody" });
      expect(nobody.stdout).toBe("nobody\n");
    } finally {
      await sandbox.kill();
    }
  });

  it("keeps a background process: stdin, list, kill", async () => {
    const sandbox = await sdk.Sandbox.create("base");
    try {
      const out: string[] = [];
      const handle = await sandbox.commands.run("while read line; do echo got:$line; done", { background: true, stdin: true, onStdout: (d: string) => out.push(d) });
      expect(handle.pid).toBeGreaterThan(0);
      await sandbox.commands.sendStdin(handle.pid, "one\n");
      await sandbox.commands.sendStdin(handle.pid, "two\n");
      const deadline = Date.now() + 20_000;
      while (out.join("") !== "got:one\ngot:two\n" && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      expect(out.join("")).toBe("got:one\ngot:two\n");
      const listed = await sandbox.commands.list();
      expect(listed.map((p: { pid: number }) => p.pid)).toContain(handle.pid);
      // Leaving does not stop it; reconnecting by pid follows its output from then on.
      await handle.disconnect();
      await sandbox.commands.sendStdin(handle.pid, "three\n");
      const again: string[] = [];
      const reattached = await sandbox.commands.connect(handle.pid, { onStdout: (d: string) => again.push(d) });
      await sandbox.commands.sendStdin(handle.pid, "four\n");
      const until = Date.now() + 20_000;
      while (!again.join("").includes("got:four\n") && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
      expect(again.join("")).toContain("got:four\n");
      expect(out.join("")).not.toContain("got:four");
      expect(await sandbox.commands.kill(handle.pid)).toBe(true);
      const end = await reattached.wait().catch((e: unknown) => e);
      expect(end.exitCode).not.toBe(0);
      expect(await sandbox.commands.kill(handle.pid)).toBe(false);
      expect((await sandbox.commands.list()).map((p: { pid: number }) => p.pid)).not.toContain(handle.pid);
    } finally {
      await sandbox.kill();
    }
  });

  it("writes and reads files", async () => {
    const sandbox = await sdk.Sandbox.create("base");
    try {
      await sandbox.files.write("/tmp/dir/a.txt", "hello file");
      expect(await sandbox.files.read("/tmp/dir/a.txt")).toBe("hello file");
      const big = Buffer.alloc(3 * 1024 * 1024 + 17, 7);
      await sandbox.files.write("/tmp/big.bin", big.buffer.slice(big.byteOffset, big.byteOffset + big.length));
      const back = await sandbox.files.read("/tmp/big.bin", { format: "bytes" });
      expect(Buffer.from(back).equals(big)).toBe(true);
      const check = await sandbox.commands.run("cat /tmp/dir/a.txt; wc -c < /tmp/big.bin");
      expect(check.stdout).toBe(`hello file${big.length}\n`);
      await expect(sandbox.files.read("/tmp/missing.txt")).rejects.toBeInstanceOf(sdk.NotFoundError ?? sdk.FileNotFoundError);
    } finally {
      await sandbox.kill();
    }
  });

  it("stats, lists, makes, moves, removes and watches files", async () => {
    const sandbox = await sdk.Sandbox.create("base");
    try {
      await sandbox.files.write("/tmp/fs/a.txt", "aaa");
      expect(await sandbox.files.exists("/tmp/fs/a.txt")).toBe(true);
      expect(await sandbox.files.exists("/tmp/fs/none.txt")).toBe(false);
      const info = await sandbox.files.getInfo("/tmp/fs/a.txt");
      expect(info).toMatchObject({ name: "a.txt", path: "/tmp/fs/a.txt", type: "file", size: 3, owner: "root", permissions: "-rw-r--r--" });
      expect(Math.abs(new Date(info.modifiedTime).getTime() - Date.now())).toBeLessThan(120_000);
      expect(await sandbox.files.makeDir("/tmp/fs/sub/deeper")).toBe(true);
      expect(await sandbox.files.makeDir("/tmp/fs/sub/deeper")).toBe(false);
      const flat = await sandbox.files.list("/tmp/fs");
      expect(flat.map((e: { name: string; type: string }) => `${e.name}:${e.type}`).sort()).toEqual(["a.txt:file", "sub:dir"]);
      const deep = await sandbox.files.list("/tmp/fs", { depth: 3 });
      expect(deep.map((e: { path: string }) => e.path).sort()).toEqual(["/tmp/fs/a.txt", "/tmp/fs/sub", "/tmp/fs/sub/deeper"]);
      const moved = await sandbox.files.rename("/tmp/fs/a.txt", "/tmp/fs/sub/b.txt");
      expect(moved.path).toBe("/tmp/fs/sub/b.txt");
      expect(await sandbox.files.read("/tmp/fs/sub/b.txt")).toBe("aaa");
      await expect(sandbox.files.getInfo("/tmp/fs/a.txt")).rejects.toBeInstanceOf(sdk.NotFoundError ?? sdk.FileNotFoundError);

      const events: string[] = [];
      const watcher = await sandbox.files.watchDir("/tmp/fs", (e: { name: string; type: string }) => events.push(`${e.type}:${e.name}`), { recursive: true });
      await sandbox.files.write("/tmp/fs/new.txt", "n");
      await sandbox.files.write("/tmp/fs/sub/deeper/inner.txt", "i");
      await sandbox.files.remove("/tmp/fs/new.txt");
      const until = Date.now() + 20_000;
      while (!(events.some((e) => e.endsWith(":sub/deeper/inner.txt")) && events.some((e) => e.startsWith("remove:new.txt"))) && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
      await watcher.stop();
      expect(events).toContain("create:new.txt");
      expect(events).toContain("remove:new.txt");
      expect(events.some((e) => e.endsWith(":sub/deeper/inner.txt"))).toBe(true);

      await sandbox.files.remove("/tmp/fs");
      expect(await sandbox.files.exists("/tmp/fs")).toBe(false);
    } finally {
      await sandbox.kill();
    }
  });

  it("pauses a sandbox into a snapshot and resumes it with its files and processes", async () => {
    const sandbox = await sdk.Sandbox.create("base", { metadata: { pausing: pkg } });
    try {
      await sandbox.files.write("/tmp/state.txt", "kept across the pause");
      await sandbox.commands.run("sleep 300 >/dev/null 2>&1 &");
      const pause = typeof sandbox.pause === "function" ? () => sandbox.pause() : () => sandbox.betaPause();
      expect(await pause()).toBe(true);
      expect(await pause()).toBe(false); // already paused: 409
      const info = await sdk.Sandbox.getInfo(sandbox.sandboxId);
      expect(info.state).toBe("paused");
      expect(await sandbox.isRunning()).toBe(false);
      const resumed = await sdk.Sandbox.connect(sandbox.sandboxId);
      expect(await resumed.isRunning()).toBe(true);
      expect(await resumed.files.read("/tmp/state.txt")).toBe("kept across the pause");
      expect((await resumed.commands.run("ps -o args | grep -c '^sleep 300'")).stdout.trim()).toBe("1");
      expect((await sdk.Sandbox.getInfo(sandbox.sandboxId)).state).toBe("running");
    } finally {
      await sdk.Sandbox.kill(sandbox.sandboxId);
    }
    // Its snapshot went with it.
    expect(existsSync(join(pausedRoot(), sandbox.sandboxId))).toBe(false);
  });

  it("lists by metadata, extends the timeout, and kills", async () => {
    const tag = `${pkg}-${Date.now()}`;
    const a = await sdk.Sandbox.create("base", { metadata: { tag, n: "1" } });
    const b = await sdk.Sandbox.create("base", { metadata: { tag, n: "2" }, timeoutMs: 60_000 });
    try {
      const paginator = sdk.Sandbox.list({ query: { metadata: { tag } } });
      const found = Array.isArray(paginator) ? paginator : await paginator.nextItems();
      expect(found.map((s: { sandboxId: string }) => s.sandboxId).sort()).toEqual([a.sandboxId, b.sandboxId].sort());
      const only = sdk.Sandbox.list({ query: { metadata: { tag, n: "2" } } });
      expect((Array.isArray(only) ? only : await only.nextItems()).map((s: { sandboxId: string }) => s.sandboxId)).toEqual([b.sandboxId]);

      const before = await b.getInfo();
      await b.setTimeout(600_000);
      const after = await b.getInfo();
      expect(new Date(after.endAt).getTime()).toBeGreaterThan(new Date(before.endAt).getTime() + 400_000);
      expect(await b.isRunning()).toBe(true);

      await a.kill();
      expect(await a.isRunning()).toBe(false);
      await expect(sdk.Sandbox.connect(a.sandboxId)).rejects.toThrow();
    } finally {
      await a.kill().catch(() => {});
      await b.kill();
    }
  });
});

describe("the latest SDK's other paths", () => {
  it("uploads gzip and streamed bodies and several files at once, and runs a terminal", async () => {
    const { Sandbox } = await import("e2b");
    const sandbox = await Sandbox.create("base");
    try {
      await sandbox.files.write("/tmp/gz.txt", "compressed on the way", { gzip: true });
      const stream = new ReadableStream({
        start(c) {
          for (let i = 0; i < 64; i++) c.enqueue(new TextEncoder().encode(`line ${i}\n`));
          c.close();
        },
      });
      await sandbox.files.write("/tmp/streamed.txt", stream);
      const many = await sandbox.files.write([
        { path: "/tmp/many/one.txt", data: "1" },
        { path: "/tmp/many/two.txt", data: "22" },
      ]);
      expect(many.map((f) => f.path).sort()).toEqual(["/tmp/many/one.txt", "/tmp/many/two.txt"]);
      const check = await sandbox.commands.run("cat /tmp/gz.txt; echo; wc -l < /tmp/streamed.txt; cat /tmp/many/one.txt /tmp/many/two.txt");
      expect(check.stdout).toBe("compressed on the way\n64\n122");
      const chunks: Buffer[] = [];
      for await (const c of await sandbox.files.read("/tmp/streamed.txt", { format: "stream" })) chunks.push(Buffer.from(c));
      expect(Buffer.concat(chunks).toString().split("\n")[63]).toBe("line 63");
      // A file the user writes belongs to the user.
      await sandbox.files.write("/tmp/owned.txt", "mine", { user: "nobody" });
      expect((await sandbox.commands.run("stat -c %U /tmp/owned.txt")).stdout).toBe("nobody\n");

      const out: Buffer[] = [];
      const term = await sandbox.pty.create({ cols: 100, rows: 30, onData: (d: Uint8Array) => void out.push(Buffer.from(d)) });
      await sandbox.pty.sendInput(term.pid, new TextEncoder().encode("stty size; echo pty-$((6*7))\n"));
      const seen = async (text: string) => {
        const deadline = Date.now() + 20_000;
        while (!Buffer.concat(out).toString().includes(text) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
        expect(Buffer.concat(out).toString()).toContain(text);
      };
      await seen("30 100");
      await seen("pty-42");
      await sandbox.pty.resize(term.pid, { cols: 120, rows: 40 });
      await sandbox.pty.sendInput(term.pid, new TextEncoder().encode("stty size\n"));
      await seen("40 120");
      await sandbox.pty.sendInput(term.pid, new TextEncoder().encode("exit\n"));
      const end = await term.wait();
      expect(end.exitCode).toBe(0);
    } finally {
      await sandbox.kill();
    }
  });
});

describe("sandbox life", () => {
  it("releases a sandbox when its time runs out", async () => {
    const { Sandbox } = await import("e2b");
    const sandbox = await Sandbox.create("base", { timeoutMs: 2_000 });
    expect(await sandbox.isRunning()).toBe(true);
    const deadline = Date.now() + 20_000;
    while ((await sandbox.isRunning()) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
    expect(await sandbox.isRunning()).toBe(false);
    await expect(sandbox.commands.run("true")).rejects.toThrow();
  });
});
