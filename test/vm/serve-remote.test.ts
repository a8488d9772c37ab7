// The remote client against `supermachine serve` on loopback with real microVMs: examples 01-05
// and patterns 1-4 run unchanged but for SUPERMACHINE_URL and SUPERMACHINE_API_KEY in their
// environment (the way
// docs/serve.md tells users to), as `node examples/<file>` does; then the client's own
// behaviour (errors as library classes, flow control, a process that outlives its socket, TCP
// half-close), and fuzzed request bodies against a live sandbox, which must never get a 5xx.
import { spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { createConnection } from "node:net";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import fc from "fast-check";
import WebSocket from "ws";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, ExecError, GuestFileError, ServerError, OptionError, type RemotePools } from "../../src/index.js";
import { projectDir, testServer, type TestServer } from "../helpers/serve.js";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
/**
 * The server's project: the pools examples 01-05 and patterns 1-4 ask for, each declared with the
 * options the pattern gives Image.build and image.pool when it runs locally.
 */
const project = (pythonRef: string) => `import { defineConfig, defineImage } from "supermachine/config";
const TOOLS = \`
def summarize(xs):
    return f"n={len(xs)} min={min(xs)} max={max(xs)} mean={sum(xs) / len(xs):.2f}"
\`;
export default defineConfig({
  images: {
    box: defineImage({ ref: "builtin:busybox" }),
    python: defineImage({ ref: ${JSON.stringify(pythonRef)}, memoryMib: 512 }),
    agent: defineImage({
      ref: ${JSON.stringify(pythonRef)},
      memoryMib: 512,
      env: { PYTHONPATH: "/opt/agent" },
      warmupTag: "tools-v1",
      warmup: async (vm) => {
        await vm.writeFile("/opt/agent/tools.py", TOOLS);
        const r = await vm.exec({ argv: ["python3", "-c", "import tools"], timeoutMs: 60_000 });
        if (r.exitCode !== 0) throw new Error("warmup failed: " + r.stderr);
      },
    }),
    httpd: defineImage({
      ref: "builtin:busybox",
      cmd: ["sh", "-c", 'mkdir -p /www && echo "started $(date -u +%T) UTC, instance $(head -c 4 /dev/urandom | od -An -tx1 | tr -d " \\\\n")" > /www/index.html && exec httpd -f -p 8080 -h /www'],
      guestPort: 8080,
      listenerRequired: true,
    }),
    resources: defineImage({
      ref: "builtin:busybox",
      extraFiles: [
        { hostPath: "./app.conf", guestPath: "/etc/app.conf" },
        { hostPath: "./greet.sh", guestPath: "/usr/local/bin/greet" },
      ],
    }),
  },
  pools: {
    busybox: { image: "box", min: 2, max: 4 },
    pattern1: { image: "python", min: 0, max: 2, restoreOnRelease: true },
    pattern2: { image: "agent", min: 2, max: 4, restoreOnRelease: true, acquireTimeoutMs: 30_000 },
    pattern3: { image: "httpd", min: 2, max: 2 },
    pattern4: { image: "resources", min: 1, max: 1 },
  },
});
`;

let t: TestServer;
let pools: RemotePools;

beforeAll(async () => {
  // @ts-expect-error plain JavaScript helpers without types
  const { ensureFixtures } = (await import("../fixtures/build-fixtures.mjs")) as { ensureFixtures(o: { only: string[]; log: (l: string) => void }): Promise<{ python: { ref: string } }> };
  const { python } = await ensureFixtures({ only: ["python"], log: () => {} });
  const dir = projectDir(project(python.ref));
  writeFileSync(join(dir, "app.conf"), "greeting=hello\n");
  writeFileSync(join(dir, "greet.sh"), '#!/bin/sh\n. /etc/app.conf\necho "$greeting from a baked-in script"\n', { mode: 0o755 });
  t = await testServer({ cwd: dir });
  pools = await connect(t.server.url, { apiKey: t.key });
});

afterAll(async () => {
  await pools?.close();
  await t?.close();
});

function runExample(file: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join("examples", file)], {
      cwd: ROOT,
      env: { ...process.env, SUPERMACHINE_URL: t.server.url, SUPERMACHINE_API_KEY: t.key },
      stdio: ["ignore", "pipe", "pipe"],
      timeout: 240_000,
      killSignal: "SIGKILL",
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on("data", (c: Buffer) => out.push(c));
    child.stderr.on("data", (c: Buffer) => err.push(c));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() }));
  });
}

/** What each example prints when its pool is the server's (sandbox ids where it prints QEMU pids). */
const EXPECTED: Record<string, Array<string | RegExp | ((stdout: string) => void)>> = {
  "01-hello.mjs": ["exit 0: hello from supermachine"],
  "02-pool.mjs": [
    "pool ready: alive 2, in use 0, idle 2, waiting 0 (min 2, max 4)",
    /4 acquired: alive 4, in use 4, idle 0, waiting 0 \(min 2, max 4\)/,
    /task 1 was here \(sandbox [a-z0-9]{20}\)/,
    /task 4 was here \(sandbox [a-z0-9]{20}\)/,
    "next acquire: no /tmp/leftover: a clean VM",
  ],
  "03-snapshot-then-restore.mjs": [/snapshot saved: snapshot [a-z0-9]{20} on the server\n/, /new VM \(sandbox [a-z0-9]{20}\) sees:/, "  notes: written before the snapshot\n", "  answer: 42\n"],
  "04-expose-tcp.mjs": [/guest port 8080 is at http:\/\/127\.0\.0\.1:\d+\//, "GET /index.html -> 200 OK, text/html", "body: <h1>hello from inside the VM</h1>", "GET /nope.html -> 404"],
  "pattern-1-one-shot-exec.mjs": [
    /sum-of-squares +ok: 285\n/,
    /tampers +ok: deleted python3\n/,
    /checks-python +ok: python3 still there: True\n/,
    /crashes +failed, exit 1: ValueError: bad candidate\n/,
    /never-ends +timed out after 5 s \(killed\)\n/,
  ],
  "pattern-2-agent-runtime.mjs": [
    "image ready: the server's pattern2 pool, baked with its warmup\n",
    "task 1: exit 0\n  n=5 min=1 max=5 mean=2.80\n  byte-compiled at warmup: True\n  scratch from an earlier task: False\n",
    "task 3: exit 0\n",
  ],
  "pattern-3-persistent-service.mjs": [
    /VM \(sandbox [a-z0-9]{20}\): 200 "started [0-9:]+ UTC, instance [0-9a-f]{8}"/,
    "same page in both VMs: the server started once, at bake time, and was captured running",
    (stdout) => {
      const pages = [...stdout.matchAll(/: 200 "([^"]+)"/g)].map((m) => m[1]);
      expect(pages).toHaveLength(2);
      expect(pages[0]).toBe(pages[1]);
    },
  ],
  "pattern-4-resource-files.mjs": ["  guest says: hello from a baked-in script\n"],
  "05-spawn-streaming.mjs": [
    (stdout) => {
      const at = [...stdout.matchAll(/\+ *(\d+) ms {2}tick (\d)\n/g)].map((m) => Number(m[1]));
      expect(at, "arrival times of tick 1..5").toHaveLength(5);
      expect(at[4]! - at[0]!, "ms between tick 1 and tick 5 on the client").toBeGreaterThanOrEqual(500);
    },
    /exit 0 after \d+ ms in the guest/,
    'sent "hello", got "HELLO"',
    'sent "streaming stdin", got "STREAMING STDIN"',
    'after closeStdin: "bye", exit 0',
    "stty size with winsize { cols: 100, rows: 30 }: 30 100",
    "stty size after resize(132, 43): 43 132",
  ],
};

describe("examples through the remote client", () => {
  for (const [file, checks] of Object.entries(EXPECTED)) {
    it(`${file} runs against the server`, async () => {
      const r = await runExample(file);
      const report = `node examples/${file} (remote): exit ${r.code}\n--- stdout\n${r.stdout}--- stderr\n${r.stderr}`;
      expect(r.code, report).toBe(0);
      for (const want of checks) {
        if (typeof want === "string") expect(r.stdout, report).toContain(want);
        else if (want instanceof RegExp) expect(r.stdout, report).toMatch(want);
        else want(r.stdout);
      }
      // Every sandbox the example took was released, and its snapshots' sandboxes too.
      const left = (await (await fetch(`${t.server.url}/v1/sandboxes`, { headers: { "x-api-key": t.key } })).json()) as { sandboxes: unknown[] };
      expect(left.sandboxes, report).toEqual([]);
    }, 260_000);
  }
});

describe("the remote client", () => {
  it("stats, lists, makes, moves and removes files as a local VM does", async () => {
    await using vm = await pools.busybox!.acquire();
    await vm.writeFile("/tmp/r/a.txt", "abc");
    expect(await vm.makeDir("/tmp/r/sub/deeper", { parents: true, uid: 65534, gid: 65534 })).toBe(true);
    expect(await vm.makeDir("/tmp/r/sub/deeper", { parents: true })).toBe(false);
    await expect(vm.makeDir("/tmp/r/sub")).rejects.toMatchObject({ code: "EEXIST" });
    const a = await vm.stat("/tmp/r/a.txt");
    expect(a).toMatchObject({ path: "/tmp/r/a.txt", name: "a.txt", type: "file", size: 3, mode: 0o644, uid: 0 });
    expect((await vm.stat("/tmp/r/sub/deeper")).uid).toBe(65534);
    const entries = await vm.readDir("/tmp/r", { depth: 3 });
    expect(entries.map((e) => `${e.path}:${e.type}`).sort()).toEqual(["/tmp/r/a.txt:file", "/tmp/r/sub/deeper:directory", "/tmp/r/sub:directory"]);
    await vm.rename("/tmp/r/a.txt", "/tmp/r/sub/b.txt");
    expect((await vm.readFile("/tmp/r/sub/b.txt")).toString()).toBe("abc");
    const gone = await vm.stat("/tmp/r/a.txt").catch((e: unknown) => e);
    expect(gone).toBeInstanceOf(GuestFileError);
    expect((gone as GuestFileError).code).toBe("ENOENT");
    await expect(vm.remove("/tmp/r")).rejects.toMatchObject({ code: expect.stringMatching(/ENOTEMPTY|EISDIR/) });
    await vm.remove("/tmp/r", { recursive: true });
    await expect(vm.stat("/tmp/r")).rejects.toMatchObject({ code: "ENOENT" });
  });

  it("raises the library's error classes with the server's code and hint", async () => {
    await using vm = await pools.busybox!.acquire();
    const missing = await vm.readFile("/no/such/file").catch((e: unknown) => e);
    expect(missing).toBeInstanceOf(GuestFileError);
    expect((missing as GuestFileError).code).toBe("ENOENT");
    expect((missing as GuestFileError).hint).toBeTruthy();
    // Checked on the client with the local schemas: the same OptionError as locally.
    await expect(vm.exec({ argv: [] })).rejects.toBeInstanceOf(OptionError);
    const noPool = await connect(t.server.url, { apiKey: t.key }).then((p) => p.fromSnapshot("aaaaaaaaaaaaaaaaaaaa").acquire()).catch((e: unknown) => e);
    expect(noPool).toBeInstanceOf(ServerError);
    expect((noPool as ServerError).code).toBe("SERVER_NOT_FOUND");
    const badKey = await connect(t.server.url, { apiKey: "e2b_00000000000000000000000000000000" }).catch((e: unknown) => e);
    expect((badKey as ServerError).code).toBe("SERVER_UNAUTHORIZED");
    const unreachable = await connect("http://127.0.0.1:1", { apiKey: t.key }).catch((e: unknown) => e);
    expect((unreachable as ServerError).code).toBe("SERVER_UNREACHABLE");
  });

  it("spawn: flow control holds a fast producer, a closed socket leaves the process running, signals reach it", async () => {
    await using vm = await pools.busybox!.acquire();
    // 64 MiB of output nobody reads: the guest is held back instead of the client's memory filling.
    const flood = await vm.spawn({ argv: ["sh", "-c", "head -c 67108864 /dev/zero; echo done >&2"] });
    await new Promise((r) => setTimeout(r, 3_000));
    expect(flood.exited).toBe(false);
    let got = 0;
    for await (const c of flood.stdout) got += (c as Buffer).length;
    expect(got).toBe(64 * 1024 * 1024);
    expect((await flood.readStderr()).toString()).toBe("done\n");
    expect((await flood.wait()).exitCode).toBe(0);

    // A socket that goes away does not kill the process (no killOnDisconnect).
    const sleeper = await vm.spawn({ argv: ["sh", "-c", "sleep 60"] });
    const pid = sleeper.pid!;
    (sleeper as unknown as { ws: WebSocket }).ws.terminate();
    await expect(sleeper.wait()).rejects.toBeInstanceOf(ServerError);
    const ps = await vm.exec({ argv: ["sh", "-c", `kill -0 ${pid} && echo alive`] });
    expect(ps.stdout.toString()).toBe("alive\n");
    // Attach to it by pid over a new socket and signal it.
    const attached = new WebSocket(`${t.server.url.replace("http", "ws")}/v1/sandboxes/${vm.id}/processes/${pid}`, { headers: { "x-api-key": t.key } });
    const frames: Array<Record<string, unknown>> = [];
    attached.on("message", (d: Buffer, binary: boolean) => binary || frames.push(JSON.parse(d.toString())));
    await new Promise((r) => attached.once("open", r));
    attached.send(JSON.stringify({ type: "signal", signal: "SIGTERM", id: 1 }));
    await new Promise((r) => attached.once("close", r));
    expect(frames[0]).toMatchObject({ type: "started", pid });
    expect(frames).toContainEqual({ type: "ack", id: 1 });
    expect(frames.at(-1)).toMatchObject({ type: "exit", result: { signal: "SIGTERM" } });

    // killOnDisconnect: the process dies with its socket.
    const doomed = await vm.spawn({ argv: ["sh", "-c", "sleep 60"], killOnDisconnect: true });
    (doomed as unknown as { ws: WebSocket }).ws.terminate();
    const deadline = Date.now() + 20_000;
    let alive = true;
    while (alive && Date.now() < deadline) {
      alive = (await vm.exec({ argv: ["sh", "-c", `kill -0 ${doomed.pid} 2>/dev/null && echo alive || true`] })).stdout.toString() === "alive\n";
      if (alive) await new Promise((r) => setTimeout(r, 200));
    }
    expect(alive).toBe(false);

    const exited = await vm.spawn({ argv: ["true"] });
    await exited.wait();
    await expect(exited.signal("SIGTERM")).rejects.toBeInstanceOf(ExecError);
  });

  it("files stream both ways; exposeTcp carries half-closes and big transfers", async () => {
    await using vm = await pools.busybox!.acquire();
    const big = Buffer.alloc(9 * 1024 * 1024 + 3, 0x5a);
    expect(await vm.writeFileStream("/tmp/big", (async function* () {
      for (let i = 0; i < big.length; i += 1 << 20) yield big.subarray(i, i + (1 << 20));
    })())).toBe(big.length);
    const chunks: Buffer[] = [];
    for await (const c of await vm.readFileStream("/tmp/big")) chunks.push(c as Buffer);
    expect(Buffer.concat(chunks).equals(big)).toBe(true);
    await expect(vm.readFile("/tmp/big")).rejects.toMatchObject({ code: "FILE_TOO_LARGE" });

    // An echo server that answers once its input ends: the client's half-close must reach it.
    await vm.exec({ argv: ["sh", "-c", "nc -l -p 7000 -e sh -c 'wc -c' >/dev/null 2>&1 &"], detach: true });
    await new Promise((r) => setTimeout(r, 500));
    const fwd = await vm.exposeTcp(0, 7000);
    try {
      const answer = await new Promise<string>((resolve, reject) => {
        const s = createConnection({ host: "127.0.0.1", port: fwd.port, allowHalfOpen: true });
        let text = "";
        s.on("data", (c) => (text += c.toString()));
        s.on("end", () => resolve(text));
        s.on("error", reject);
        s.end(Buffer.alloc(3 * 1024 * 1024, 1));
      });
      expect(answer.trim()).toBe(String(3 * 1024 * 1024));
      // Nothing listens on 7001: the local connection is reset, as locally.
      const fwd2 = await vm.exposeTcp(0, 7001);
      const refused = await new Promise<string>((resolve) => {
        const s = createConnection({ host: "127.0.0.1", port: fwd2.port });
        s.on("error", (e: NodeJS.ErrnoException) => resolve(e.code ?? "error"));
        s.on("close", () => resolve("closed"));
      });
      expect(["ECONNRESET", "closed"]).toContain(refused);
      await fwd2.stop();
    } finally {
      await fwd.stop();
    }
  });

  it("answers fuzzed request bodies with a 4xx, never a 5xx", async () => {
    await using vm = await pools.busybox!.acquire();
    // Not the snapshot route: a valid (empty) body takes a full capture each time (the unit fuzz covers its validation).
    const routes = [`/v1/sandboxes/${vm.id}/exec`, `/v1/sandboxes/${vm.id}/timeout`, "/v1/sandboxes"];
    const json = fc.oneof(
      fc.jsonValue(),
      fc.record({ argv: fc.oneof(fc.array(fc.string(), { maxLength: 3 }), fc.jsonValue()), cwd: fc.oneof(fc.string(), fc.constant("/nonexistent")), user: fc.string(), timeoutMs: fc.oneof(fc.integer(), fc.double()), env: fc.dictionary(fc.string(), fc.jsonValue()) }, { requiredKeys: [] }),
      fc.record({ pool: fc.string(), snapshot: fc.string(), timeoutMs: fc.jsonValue(), metadata: fc.jsonValue() }, { requiredKeys: [] }),
    );
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...routes), json, async (route, body) => {
        // Bodies that are valid and run something are fine (2xx); never a 5xx.
        if (route.endsWith("/exec") && Array.isArray((body as { argv?: unknown })?.argv) && ((body as { argv: unknown[] }).argv.length > 0)) (body as Record<string, unknown>).timeoutMs = 2_000;
        // A valid short life would end the sandboxes the other bodies run in.
        if (route.endsWith("/timeout") && typeof (body as { timeoutMs?: unknown })?.timeoutMs === "number") (body as Record<string, unknown>).timeoutMs = Math.max(600_000, (body as { timeoutMs: number }).timeoutMs);
        const res = await fetch(t.server.url + route, { method: "POST", headers: { "x-api-key": t.key, "content-type": "application/json" }, body: JSON.stringify(body) });
        const text = await res.text();
        if (res.status === 201 && route === "/v1/sandboxes") await fetch(`${t.server.url}/v1/sandboxes/${JSON.parse(text).id}`, { method: "DELETE", headers: { "x-api-key": t.key } });
        expect(res.status, `${route} ${JSON.stringify(body)} -> ${text}`).toBeLessThan(500);
      }),
      { numRuns: 60 },
    );
  });
});
