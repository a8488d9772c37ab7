// Operating `supermachine serve` with real microVMs: keys (none, wrong, revoked, the per-key
// limit), probes and metrics, SIGTERM's drain and a SIGKILL mid-exec of the real CLI process (no
// QEMU left either way), and 1,000 sequential creates without a leak.
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { readdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { KeyStore } from "../../src/server/keys.js";
import { projectDir, testServer, type TestServer } from "../helpers/serve.js";
import { waitFor } from "../helpers/vm.js";

const root = join(import.meta.dirname, "..", "..");
const children: ChildProcess[] = [];
const dirs: string[] = [];
afterEach(() => {
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
});
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** QEMU processes started by the Node process `pid` (their run dirs are named sm-<pid>-*). */
function qemuOf(pid: number): number[] {
  const r = spawnSync("pgrep", ["-f", `qemu-system.*/sm-${pid}-`], { encoding: "utf8" });
  return r.stdout.split("\n").filter(Boolean).map(Number);
}

async function post(url: string, body: unknown, key?: string): Promise<Response> {
  return fetch(url, { method: "POST", headers: { "content-type": "application/json", ...(key ? { "x-api-key": key } : {}) }, body: JSON.stringify(body) });
}

describe("keys", () => {
  let t: TestServer;
  afterAll(async () => t?.close());

  it("refuses requests without a key, with a wrong or revoked key, and past the key's limit", async () => {
    t = await testServer();
    const url = t.server.url;
    const none = await post(`${url}/v2/sandboxes`, { templateID: "base" });
    expect(none.status).toBe(401);
    expect(await none.json()).toMatchObject({ code: 401, errorCode: "SERVER_UNAUTHORIZED", hint: expect.stringContaining("keys create") });
    const wrong = await post(`${url}/v2/sandboxes`, { templateID: "base" }, `e2b_${"0".repeat(32)}`);
    expect(wrong.status).toBe(401);
    expect((await fetch(`${url}/v2/sandboxes`, { headers: { authorization: `Bearer ${t.key}` } })).status).toBe(200);

    const limited = await t.keys.create({ name: "two", maxSandboxes: 2 });
    const made: string[] = [];
    for (let i = 0; i < 2; i++) {
      const r = await post(`${url}/v2/sandboxes`, { templateID: "base" }, limited.key);
      expect(r.status).toBe(201);
      made.push(((await r.json()) as { sandboxID: string }).sandboxID);
    }
    const third = await post(`${url}/v2/sandboxes`, { templateID: "base" }, limited.key);
    expect(third.status).toBe(429);
    expect(await third.json()).toMatchObject({ errorCode: "SERVER_LIMIT", message: expect.stringContaining("2 of its 2") });
    // Another key neither sees nor kills them.
    expect(await (await fetch(`${url}/v2/sandboxes`, { headers: { "x-api-key": t.key } })).json()).toEqual([]);
    expect((await fetch(`${url}/sandboxes/${made[0]}`, { method: "DELETE", headers: { "x-api-key": t.key } })).status).toBe(404);
    // Killing one makes room.
    expect((await fetch(`${url}/sandboxes/${made[0]}`, { method: "DELETE", headers: { "x-api-key": limited.key } })).status).toBe(204);
    const again = await post(`${url}/v2/sandboxes`, { templateID: "base" }, limited.key);
    expect(again.status).toBe(201);
    made[0] = ((await again.json()) as { sandboxID: string }).sandboxID;

    await t.keys.revoke(limited.record.id);
    const revoked = await fetch(`${url}/v2/sandboxes`, { headers: { "x-api-key": limited.key } });
    expect(revoked.status).toBe(401);
    // A revoked key's sandboxes still end with their time or the server; kill them through the registry here.
    for (const id of made) expect((await fetch(`${url}/sandboxes/${id}`, { method: "DELETE", headers: { "x-api-key": t.key } })).status).toBe(404);
  });

  it("ends a sandbox whose VM dies: it is no longer listed and reads as not running", async () => {
    const { Sandbox } = await import("e2b");
    const sandbox = await Sandbox.create("base", { apiKey: t.key, apiUrl: t.server.url, sandboxUrl: t.server.url } as never);
    await sandbox.commands.run("reboot -f", { timeoutMs: 10_000 }).catch(() => {});
    const gone = await (async () => {
      const until = Date.now() + 15_000;
      while (Date.now() < until) {
        const list = (await (await fetch(`${t.server.url}/v2/sandboxes`, { headers: { "x-api-key": t.key } })).json()) as { sandboxID: string }[];
        if (!list.some((s) => s.sandboxID === sandbox.sandboxId)) return true;
        await new Promise((r) => setTimeout(r, 200));
      }
      return false;
    })();
    expect(gone).toBe(true);
    expect(await sandbox.isRunning()).toBe(false);
    // The pool replaced the VM: the next sandbox works.
    const next = await Sandbox.create("base", { apiKey: t.key, apiUrl: t.server.url, sandboxUrl: t.server.url } as never);
    expect((await next.commands.run("echo ok")).stdout).toBe("ok\n");
    await next.kill();
  });

  it("names an unknown pool and a bad body, and answers probes and metrics without a key", async () => {
    const url = t.server.url;
    const unknown = await post(`${url}/v2/sandboxes`, { templateID: "nope" }, t.key);
    expect(unknown.status).toBe(404);
    expect(await unknown.json()).toMatchObject({ errorCode: "SERVER_POOL_UNKNOWN", message: expect.stringContaining('"base"') });
    const bad = await post(`${url}/v2/sandboxes`, { templateID: 7 }, t.key);
    expect(bad.status).toBe(400);
    expect(await bad.json()).toMatchObject({ errorCode: "SERVER_BAD_REQUEST", message: expect.stringContaining("templateID") });
    const garbage = await fetch(`${url}/v2/sandboxes`, { method: "POST", headers: { "content-type": "application/json", "x-api-key": t.key }, body: "{not json" });
    expect(garbage.status).toBe(400);

    expect((await fetch(`${url}/healthz`)).status).toBe(200);
    expect(await (await fetch(`${url}/readyz`)).json()).toEqual({ status: "ready" });
    const metrics = await (await fetch(`${url}/metrics`)).text();
    expect(metrics).toMatch(/supermachine_pool_vms\{pool="base",state="idle"\} \d+/);
    expect(metrics).toMatch(/supermachine_sandbox_creates_total\{pool="base",result="ok"\} [1-9]/);
    expect(metrics).toMatch(/supermachine_sandbox_creates_total\{pool="base",result="limit"\} 1/);
    expect(metrics).toMatch(/supermachine_acquire_seconds_count\{pool="base"\} [1-9]/);
    expect(metrics).toMatch(/supermachine_http_requests_total\{method="POST",route="\/v2\/sandboxes",status="429"\} 1/);
    const withId = await fetch(`${url}/healthz`, { headers: { "x-request-id": "trace-me-42" } });
    expect(withId.headers.get("x-request-id")).toBe("trace-me-42");
  });
});

interface Cli {
  proc: ChildProcess;
  url: string;
  key: string;
  stderr: () => string;
}

async function serveCli(extra: string[] = []): Promise<Cli> {
  const dir = projectDir();
  dirs.push(dir);
  const keys = new KeyStore(join(dir, "keys.json"));
  const { key } = await keys.create();
  const proc = spawn(process.execPath, [join(root, "dist/src/cli/main.js"), "serve", "--json", "--listen", "127.0.0.1:0", "--keys", keys.path, "--log-level", "warn", ...extra], { cwd: dir, stdio: ["ignore", "pipe", "pipe"] });
  children.push(proc);
  let out = "";
  let err = "";
  proc.stderr!.on("data", (d: Buffer) => (err += d.toString()));
  const url = await new Promise<string>((resolve, reject) => {
    proc.stdout!.on("data", (d: Buffer) => {
      out += d.toString();
      const ready = out.split("\n").map((l) => (l.startsWith("{") ? (JSON.parse(l) as { type: string; url: string }) : undefined)).find((l) => l?.type === "ready");
      if (ready) resolve(ready.url);
    });
    proc.once("exit", (code) => reject(new Error(`serve exited (${code}) before it was ready:\n${err}`)));
  });
  return { proc, url, key, stderr: () => err };
}

const exited = (c: ChildProcess) => new Promise<number | null>((r) => (c.exitCode !== null || c.signalCode !== null ? r(c.exitCode) : c.once("exit", (code) => r(code))));

describe("the serve command", () => {
  it("drains on SIGTERM: no new sandboxes, live ones released after the grace, exit 0, no QEMU left", async () => {
    const s = await serveCli(["--drain-grace", "3"]);
    const created = await post(`${s.url}/v2/sandboxes`, { templateID: "base" }, s.key);
    expect(created.status).toBe(201);
    const sb = (await created.json()) as { sandboxID: string; envdAccessToken: string };
    const qemus = qemuOf(s.proc.pid!);
    expect(qemus.length).toBeGreaterThan(0);
    const { Sandbox } = await import("e2b");
    const sandbox = await Sandbox.connect(sb.sandboxID, { apiKey: s.key, apiUrl: s.url, sandboxUrl: s.url } as never);
    const running = sandbox.commands.run("sleep 60", { timeoutMs: 0 }).then(
      () => "finished",
      (e: Error) => e,
    );
    await new Promise((r) => setTimeout(r, 500));
    const t0 = Date.now();
    s.proc.kill("SIGTERM");
    await waitFor(() => s.stderr().includes("draining"), 10_000);
    const during = await post(`${s.url}/v2/sandboxes`, { templateID: "base" }, s.key);
    expect(during.status).toBe(503);
    expect(await during.json()).toMatchObject({ errorCode: "SERVER_DRAINING" });
    const code = await exited(s.proc);
    expect(code).toBe(0);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(2_500);
    const result = await running;
    expect(result).toBeInstanceOf(Error);
    expect(await waitFor(() => qemus.every((p) => !isAlive(p)), 10_000)).toBe(true);
  });

  it("dies with its VMs when killed mid-exec: the client's call fails, no QEMU is left", async () => {
    const s = await serveCli();
    const { Sandbox } = await import("e2b");
    const sandbox = await Sandbox.create("base", { apiKey: s.key, apiUrl: s.url, sandboxUrl: s.url } as never);
    const qemus = qemuOf(s.proc.pid!);
    expect(qemus.length).toBeGreaterThan(0);
    const running = sandbox.commands.run("echo started; sleep 60", { timeoutMs: 0 }).then(
      () => undefined,
      (e: Error) => e,
    );
    await new Promise((r) => setTimeout(r, 1_000));
    s.proc.kill("SIGKILL");
    const err = await running;
    expect(err).toBeInstanceOf(Error);
    expect(String(err?.message)).toMatch(/terminated|closed|socket|ECONNRESET|fetch failed|network|unavailable|other side/i);
    expect(await waitFor(() => qemus.every((p) => !isAlive(p)), 10_000)).toBe(true);
  });
});

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return !/\) Z /.test(spawnSync("cat", [`/proc/${pid}/stat`], { encoding: "utf8" }).stdout);
  } catch {
    return false;
  }
}

describe("a sandbox's own network", () => {
  it("is refused unless the server allows it, then reaches what it allows and nothing else", async () => {
    const { createServer } = await import("node:http");
    const web = createServer((_req, res) => res.end("hello through the proxy\n"));
    await new Promise<void>((r) => web.listen(0, "127.0.0.1", r));
    const port = (web.address() as { port: number }).port;
    const network = { allow: [`127.0.0.1:${port}`] };
    const closed = await testServer();
    const open = await testServer({ allowSandboxNetwork: true }, `import { defineConfig, defineImage } from "supermachine/config";
export default defineConfig({
  images: { box: defineImage({ ref: "builtin:busybox" }) },
  pools: { base: { image: "box", min: 1, max: 2 }, online: { image: "box", min: 0, max: 1, network: { allow: ["example.com"] } } },
});
`);
    try {
      const create = (t: TestServer, body: unknown) => post(`${t.server.url}/v1/sandboxes`, body, t.key);
      const refused = await create(closed, { pool: "base", network });
      expect(refused.status).toBe(400);
      expect(await refused.json()).toMatchObject({ errorCode: "SERVER_BAD_REQUEST", hint: expect.stringContaining("--allow-sandbox-network") });
      const bad = await create(open, { pool: "base", network: { allow: ["not a host!"] } });
      expect(bad.status).toBe(400);
      const conflict = await create(open, { pool: "online", network });
      expect(conflict.status).toBe(409);

      const made = await create(open, { pool: "base", network });
      expect(made.status).toBe(201);
      const { id } = (await made.json()) as { id: string };
      const exec = async (cmd: string) =>
        (await (await post(`${open.server.url}/v1/sandboxes/${id}/exec`, { argv: ["sh", "-c", cmd] }, open.key)).json()) as { stdout: string; exitCode: number };
      const ok = await exec(`wget -q -O- http://127.0.0.1:${port}/`);
      expect(Buffer.from(ok.stdout, "base64").toString()).toBe("hello through the proxy\n");
      const other = await exec("wget -q -O- http://example.com/ 2>&1; echo exit=$?");
      expect(Buffer.from(other.stdout, "base64").toString()).toMatch(/403|Forbidden|exit=[1-9]/);
      // Without the proxy variables (transparent egress): the name does not resolve, and an
      // address the program has itself is refused at once (busybox wget's -T is left out: it
      // crashes on a reset connection).
      const direct = await exec("unset http_proxy HTTP_PROXY; wget -q -O- http://example.com/ 2>&1; echo exit=$?; wget -q -O- http://203.0.113.9/ 2>&1; echo exit=$?");
      expect(Buffer.from(direct.stdout, "base64").toString()).toMatch(/bad address 'example\.com'\nexit=1\n.*reset by peer\nexit=1\n/);
      expect((await fetch(`${open.server.url}/sandboxes/${id}`, { method: "DELETE", headers: { "x-api-key": open.key } })).status).toBe(204);
      const metrics = await (await fetch(`${open.server.url}/metrics`)).text();
      expect(metrics).toMatch(/supermachine_egress_refused_total\{reason="not-allowed"\} 2\n/);
      expect(metrics).toMatch(/supermachine_egress_dns_queries_total\{answer="none"\} [1-9]/);
      expect(metrics).toMatch(/supermachine_egress_bytes_total\{direction="in"\} [1-9]/);
      // The next sandbox of the pool has no network.
      const next = (await (await create(open, { pool: "base" })).json()) as { id: string };
      const after = (await (await post(`${open.server.url}/v1/sandboxes/${next.id}/exec`, { argv: ["sh", "-c", "echo ${http_proxy:-none}"] }, open.key)).json()) as { stdout: string };
      expect(Buffer.from(after.stdout, "base64").toString()).toBe("none\n");
    } finally {
      web.close();
      await closed.close();
      await open.close();
    }
  });
});

describe("watch mode", () => {
  it("hands out sandboxes of the rebaked snapshot after a file the image stages changes", async () => {
    const dir = projectDir(`import { defineConfig, defineImage } from "supermachine/config";
export default defineConfig({
  images: { box: defineImage({ ref: "builtin:busybox", extraFiles: [{ hostPath: "./motd.txt", guestPath: "/etc/motd.txt" }] }) },
  pools: { base: { image: "box", min: 1, max: 2 } },
});
`);
    dirs.push(dir);
    writeFileSync(join(dir, "motd.txt"), "version 1\n");
    const t = await testServer({ cwd: dir, watch: true });
    try {
      const read = async () => {
        const r = await post(`${t.server.url}/v2/sandboxes`, { templateID: "base" }, t.key);
        const sb = (await r.json()) as { sandboxID: string; envdAccessToken: string };
        const file = await fetch(`${t.server.url}/files?path=/etc/motd.txt`, { headers: { "e2b-sandbox-id": sb.sandboxID, "x-access-token": sb.envdAccessToken } });
        const text = await file.text();
        await fetch(`${t.server.url}/sandboxes/${sb.sandboxID}`, { method: "DELETE", headers: { "x-api-key": t.key } });
        return text;
      };
      expect(await read()).toBe("version 1\n");
      writeFileSync(join(dir, "motd.txt"), "version 2\n");
      const until = Date.now() + 120_000;
      let seen = "";
      while (Date.now() < until && (seen = await read()) !== "version 2\n") await new Promise((r) => setTimeout(r, 500));
      expect(seen).toBe("version 2\n");
    } finally {
      await t.close();
    }
  });
});

describe("many creates", () => {
  it("serves 1,000 sequential creates and kills with flat fds, memory and processes", async () => {
    const t = await testServer({}, `import { defineConfig, defineImage } from "supermachine/config";
export default defineConfig({
  images: { box: defineImage({ ref: "builtin:busybox" }) },
  pools: { reuse: { image: "box", min: 1, max: 1, restoreOnRelease: false } },
});
`);
    try {
      const fds = () => readdirSync("/proc/self/fd").length;
      const cycle = async () => {
        const r = await post(`${t.server.url}/v2/sandboxes`, { templateID: "reuse" }, t.key);
        expect(r.status).toBe(201);
        const { sandboxID } = (await r.json()) as { sandboxID: string };
        const d = await fetch(`${t.server.url}/sandboxes/${sandboxID}`, { method: "DELETE", headers: { "x-api-key": t.key } });
        expect(d.status).toBe(204);
      };
      for (let i = 0; i < 50; i++) await cycle(); // warm up allocators and connection pools
      const before = { fds: fds(), rss: process.memoryUsage().rss, qemu: qemuOf(process.pid).length };
      for (let i = 0; i < 1000; i++) await cycle();
      await new Promise((r) => setTimeout(r, 200));
      const after = { fds: fds(), rss: process.memoryUsage().rss, qemu: qemuOf(process.pid).length };
      expect(after.fds - before.fds).toBeLessThanOrEqual(4);
      expect((after.rss - before.rss) / 2 ** 20).toBeLessThan(64);
      expect(after.qemu).toBe(before.qemu);
      const list = await (await fetch(`${t.server.url}/v2/sandboxes`, { headers: { "x-api-key": t.key } })).json();
      expect(list).toEqual([]);
    } finally {
      await t.close();
    }
  }, 600_000);
});
