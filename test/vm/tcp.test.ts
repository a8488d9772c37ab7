// TCP into the guest on real microVMs: vm.exposeTcp with a real HTTP server (busybox httpd) and
// an echo server (busybox nc -e cat), many connections, large transfers both ways, refused
// ports, busy host ports, stop() with connections in flight; the vsock and exec sockets.
import { createHash } from "node:crypto";
import { connect, createServer, type Socket } from "node:net";
import { beforeAll, describe, expect, it } from "vitest";
import { AgentClient } from "../../src/agent/client.js";
import { useBusyboxVm } from "../helpers/vm.js";

const env = useBusyboxVm();
const MiB = 1024 * 1024;

beforeAll(async () => {
  const vm = env.vm;
  // A web root with a page and a 16 MiB file, an HTTP server, an echo server and a sink.
  await vm.exec({
    argv: ["sh", "-c", "mkdir -p /www && echo '<h1>hello from the guest</h1>' > /www/index.html && dd if=/dev/urandom of=/www/big bs=1M count=16 2>/dev/null"],
  });
  await vm.exec({ argv: ["sh", "-c", "httpd -p 127.0.0.1:8080 -h /www; nc -ll -p 7000 -e cat & nc -ll -p 7001 -e sha256sum & sleep 0.3"] });
});

function connectTo(addr: string): Promise<Socket> {
  const [host, port] = addr.split(":");
  return new Promise((res, rej) => {
    const s = connect({ host: host!, port: Number(port) }, () => res(s));
    s.once("error", rej);
  });
}

/** Sends `data`, half-closes, and collects everything until the peer closes. */
function roundTrip(addr: string, data: Buffer): Promise<Buffer> {
  return connectTo(addr).then(
    (s) =>
      new Promise<Buffer>((res, rej) => {
        const got: Buffer[] = [];
        s.on("data", (c: Buffer) => got.push(c));
        s.on("end", () => res(Buffer.concat(got)));
        s.on("error", rej);
        s.end(data);
      }),
  );
}

describe("vm.exposeTcp", () => {
  it("serves a real HTTP server in the guest on 127.0.0.1", async () => {
    const fwd = await env.vm.exposeTcp(0, 8080);
    try {
      expect(fwd.localAddr).toMatch(/^127\.0\.0\.1:\d+$/);
      const res = await fetch(`http://${fwd.localAddr}/index.html`);
      expect(res.status).toBe(200);
      expect(await res.text()).toBe("<h1>hello from the guest</h1>\n");
      // Many at once.
      const many = await Promise.all(Array.from({ length: 24 }, () => fetch(`http://${fwd.localAddr}/index.html`).then((r) => r.text())));
      expect(new Set(many)).toEqual(new Set(["<h1>hello from the guest</h1>\n"]));
      // A large download, checked against the guest's own checksum.
      const big = Buffer.from(await (await fetch(`http://${fwd.localAddr}/big`)).arrayBuffer());
      expect(big.length).toBe(16 * MiB);
      const want = (await env.vm.exec({ argv: ["sha256sum", "/www/big"] })).stdout.toString().split(" ")[0];
      expect(createHash("sha256").update(big).digest("hex")).toBe(want);
    } finally {
      await fwd.stop();
    }
  });

  it("echoes through nc, uploads 12 MiB with backpressure, and half-closes", async () => {
    const echo = await env.vm.exposeTcp(0, 7000);
    const sink = await env.vm.exposeTcp(0, 7001);
    try {
      expect((await roundTrip(echo.localAddr, Buffer.from("ping\n"))).toString()).toBe("ping\n");
      const data = Buffer.alloc(12 * MiB, 0x5a);
      const echoed = await roundTrip(echo.localAddr, data);
      expect(echoed.equals(data)).toBe(true);
      const sum = (await roundTrip(sink.localAddr, data)).toString().split(" ")[0];
      expect(sum).toBe(createHash("sha256").update(data).digest("hex"));
    } finally {
      await echo.stop();
      await sink.stop();
    }
  });

  it("closes the client at once when nothing listens in the guest", async () => {
    const fwd = await env.vm.exposeTcp(0, 9999);
    try {
      const t0 = Date.now();
      const s = await connectTo(fwd.localAddr);
      const how = await new Promise<string>((res) => {
        s.on("error", (e: NodeJS.ErrnoException) => res(e.code ?? "error"));
        s.on("close", () => res("closed"));
        s.resume();
      });
      expect(["ECONNRESET", "closed"]).toContain(how);
      expect(Date.now() - t0).toBeLessThan(3_000);
    } finally {
      await fwd.stop();
    }
  });

  it("says so when the host port is in use", async () => {
    const taken = createServer();
    await new Promise<void>((r) => taken.listen(0, "127.0.0.1", () => r()));
    const port = (taken.address() as { port: number }).port;
    try {
      const e = await env.vm.exposeTcp(port, 8080).catch((x: unknown) => x);
      expect(e).toMatchObject({ code: "TCP_PORT_IN_USE" });
      expect((e as Error).message).toContain(String(port));
    } finally {
      taken.close();
    }
    await expect(env.vm.exposeTcp(-1, 80)).rejects.toMatchObject({ code: "OPTION_INVALID" });
    await expect(env.vm.exposeTcp(0, 70000)).rejects.toMatchObject({ code: "OPTION_INVALID" });
  });

  it("keeps connections in flight across stop(), refuses new ones, and stop is idempotent", async () => {
    const fwd = await env.vm.exposeTcp(0, 7000);
    const s = await connectTo(fwd.localAddr);
    const got: Buffer[] = [];
    s.on("data", (c: Buffer) => got.push(c));
    s.write("before\n");
    await fwd.stop();
    await fwd.stop();
    s.write("after stop\n");
    await new Promise((r) => setTimeout(r, 500));
    expect(Buffer.concat(got).toString()).toBe("before\nafter stop\n");
    s.end();
    await expect(connectTo(fwd.localAddr)).rejects.toMatchObject({ code: "ECONNREFUSED" });
  });
});

describe("raw sockets", () => {
  it("vsockPath: CONNECT <port> then the guest's port", async () => {
    const s = connect(env.vm.vsockPath);
    await new Promise<void>((r) => s.once("connect", () => r()));
    const got: Buffer[] = [];
    s.on("data", (c: Buffer) => got.push(c));
    s.write("CONNECT 8080\n");
    await new Promise((r) => setTimeout(r, 300));
    expect(Buffer.concat(got).toString()).toBe("OK 8080\n");
    got.length = 0;
    s.write("GET /index.html HTTP/1.0\r\n\r\n");
    await new Promise<void>((r) => s.once("end", () => r()));
    const text = Buffer.concat(got).toString();
    expect(text).toMatch(/^HTTP\/1\.[01] 200/);
    expect(text).toContain("hello from the guest");
  });

  it("execPath: a client of its own speaks the agent protocol on the second port", async () => {
    const s = connect(env.vm.execPath);
    await new Promise<void>((r, j) => (s.once("connect", () => r()), s.once("error", j)));
    const client = new AgentClient(s);
    try {
      const hello = await client.hello({ timeoutMs: 10_000 });
      expect(hello.port).toBe("supermachine.1");
      const stream = client.exec({ argv: ["echo", "from the exec port"], env: ["PATH=/bin:/usr/bin"] });
      const out: Buffer[] = [];
      stream.onStdout = (c) => out.push(c);
      expect((await stream.wait()).exitCode).toBe(0);
      expect(Buffer.concat(out).toString()).toBe("from the exec port\n");
      // The library's own channel is unaffected.
      expect((await env.vm.exec({ argv: ["echo", "still mine"] })).stdout.toString()).toBe("still mine\n");
    } finally {
      client.close();
    }
  });
});
