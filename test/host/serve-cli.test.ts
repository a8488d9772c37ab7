// `supermachine serve` and `supermachine keys` without a VM: keys made, listed and revoked through
// the CLI against a running server (which reads the key file again), HTTPS with --tls-cert and
// --tls-key (a certificate openssl makes for 127.0.0.1), and the failures that must stop the
// command with a clear message: an unreadable certificate, a port in use, no project.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { request } from "node:https";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { startServer } from "../../src/index.js";
import type { Pools } from "../../src/project/pools.js";
import { cli } from "../helpers/run.js";

const dir = mkdtempSync(join(tmpdir(), "sm-serve-cli-"));
const keysFile = join(dir, "keys.json");
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const noPools = { close: async () => {}, [Symbol.asyncDispose]: async () => {} } as unknown as Pools;

describe("supermachine keys", () => {
  it("creates keys (shown once, stored hashed, 0600), lists them without secrets, revokes one for a running server", async () => {
    const made = await cli(["keys", "create", "--name", "ci", "--max-sandboxes", "3", "--keys", keysFile, "--json"]);
    expect(made.status, made.stderr).toBe(0);
    const key = JSON.parse(made.stdout) as { key: string; id: string; name: string; maxSandboxes: number; file: string };
    expect(key).toMatchObject({ name: "ci", maxSandboxes: 3, file: keysFile });
    expect(key.key).toMatch(/^e2b_[0-9a-f]{32}$/);
    const stored = readFileSync(keysFile, "utf8");
    expect(stored).not.toContain(key.key);
    expect(statSync(keysFile).mode & 0o777).toBe(0o600);
    const text = await cli(["keys", "create", "--keys", keysFile]);
    expect(text.stdout).toMatch(/^e2b_[0-9a-f]{32}\n$/);
    expect(text.stderr).toContain("shown only now");

    const listed = await cli(["keys", "list", "--keys", keysFile]);
    expect(listed.stdout).toContain(`${key.id}  e2b_`);
    expect(listed.stdout).toContain("max 3 sandboxes");
    expect(listed.stdout).not.toContain(key.key);

    const server = await startServer({ pools: noPools, listen: "127.0.0.1:0", keys: keysFile, logLevel: "silent" });
    try {
      await server.ready;
      const list = () => fetch(`${server.url}/v2/sandboxes`, { headers: { "x-api-key": key.key } });
      expect((await list()).status).toBe(200);
      const revoked = await cli(["keys", "revoke", key.id, "--keys", keysFile]);
      expect(revoked.status, revoked.stderr).toBe(0);
      expect(revoked.stdout).toContain(`revoked ${key.id} (ci)`);
      expect((await list()).status).toBe(401);
      const again = await cli(["keys", "revoke", key.id, "--keys", keysFile]);
      expect(again.status).toBe(1);
      expect(again.stderr).toContain("no live key has the id, name or prefix");
    } finally {
      await server.close();
    }
  });
});

describe("supermachine serve", () => {
  it("serves HTTPS with --tls-cert and --tls-key", async () => {
    const cert = join(dir, "cert.pem");
    const key = join(dir, "key.pem");
    execFileSync("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert], { stdio: "ignore" });
    const server = await startServer({ pools: noPools, listen: "127.0.0.1:0", keys: keysFile, logLevel: "silent", tls: { cert, key } });
    try {
      expect(server.url).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/);
      const body = await new Promise<string>((resolve, reject) => {
        request(`${server.url}/healthz`, { ca: readFileSync(cert) }, (res) => {
          let b = "";
          res.on("data", (d: Buffer) => (b += d.toString()));
          res.on("end", () => resolve(`${res.statusCode} ${b}`));
        })
          .on("error", reject)
          .end();
      });
      expect(body).toBe('200 {"status":"ok"}');
      // Plain HTTP to it is refused.
      await expect(fetch(server.url.replace("https:", "http:") + "/healthz")).rejects.toThrow();
    } finally {
      await server.close();
    }
  });

  it("stops with a clear message on an unreadable certificate, a port in use, half a TLS pair, no project", async () => {
    const noCert = await cli(["serve", "--listen", "127.0.0.1:0", "--keys", keysFile, "--tls-cert", join(dir, "none.pem"), "--tls-key", join(dir, "none.pem")], { cwd: dir });
    expect(noCert.status).toBe(1);
    expect(noCert.stderr).toContain("cannot read the TLS certificate or key");
    const half = await cli(["serve", "--tls-cert", join(dir, "none.pem")], { cwd: dir });
    expect(half.status).toBe(2);
    expect(half.stderr).toContain("--tls-cert and --tls-key go together");

    const taken = createServer();
    await new Promise<void>((r) => taken.listen(0, "127.0.0.1", r));
    const port = (taken.address() as { port: number }).port;
    try {
      const inUse = await cli(["serve", "--listen", `127.0.0.1:${port}`, "--keys", keysFile], { cwd: dir });
      expect(inUse.status).toBe(1);
      expect(inUse.stderr).toContain(`cannot listen on 127.0.0.1:${port}`);
      expect(inUse.stderr).toContain("pick another with --listen");
    } finally {
      taken.close();
    }
    const badListen = await cli(["serve", "--listen", "nowhere", "--keys", keysFile], { cwd: dir });
    expect(badListen.status).toBe(1);
    expect(badListen.stderr).toContain('--listen "nowhere" is not host:port');

    const noProject = await cli(["serve", "--listen", "127.0.0.1:0", "--keys", keysFile], { cwd: dir, timeout: 60_000 });
    expect(noProject.status).toBe(1);
    expect(noProject.stderr).toMatch(/supermachine\.config/);
  });

  it("as a front: needs --nodes, refuses a spec it cannot read, and with no node up is live but not ready", async () => {
    const noNodes = await cli(["serve", "--front"], { cwd: dir });
    expect(noNodes.status).toBe(2);
    expect(noNodes.stderr).toContain("give the nodes with --nodes");
    const notFront = await cli(["serve", "--nodes", "127.0.0.1:1"], { cwd: dir });
    expect(notFront.status).toBe(2);
    expect(notFront.stderr).toContain("--nodes goes with --front");
    const bad = await cli(["serve", "--front", "--nodes", "dns:noport"], { cwd: dir });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toContain("expected dns:<name>:<port>");

    // A front over a node address where nothing listens: it starts, answers /healthz, and says
    // why it is not ready; a create gets SERVER_NO_NODE; SIGTERM stops it with 0.
    const { spawn } = await import("node:child_process");
    const child = spawn(process.execPath, [join(import.meta.dirname, "..", "..", "dist", "src", "cli", "main.js"), "--json", "serve", "--front", "--listen", "127.0.0.1:0", "--nodes", "127.0.0.1:1"], { cwd: dir, stdio: ["ignore", "pipe", "pipe"] });
    const exited = new Promise<number | null>((r) => child.once("close", (code) => r(code)));
    try {
      const url = await new Promise<string>((resolve, reject) => {
        let buf = "";
        child.stdout!.on("data", (c: Buffer) => {
          buf += c.toString();
          const m = buf.match(/"url":"([^"]+)"/);
          if (m) resolve(m[1]!);
        });
        void exited.then((code) => reject(new Error(`the front exited (${code})`)));
      });
      expect((await fetch(`${url}/healthz`)).status).toBe(200);
      const ready = await fetch(`${url}/readyz`);
      expect(ready.status).toBe(503);
      expect(((await ready.json()) as { reason: string }).reason).toContain("no node is ready");
      const create = await fetch(`${url}/v1/sandboxes`, { method: "POST", headers: { "content-type": "application/json", "x-api-key": "e2b_0" }, body: JSON.stringify({ pool: "base" }) });
      expect(create.status).toBe(503);
      expect(((await create.json()) as { errorCode: string }).errorCode).toBe("SERVER_NO_NODE");
      const metrics = await (await fetch(`${url}/metrics`)).text();
      expect(metrics).toContain('supermachine_front_creates_total{result="no-node"} 1');
    } finally {
      child.kill("SIGTERM");
    }
    expect(await exited).toBe(0);
  });
});
