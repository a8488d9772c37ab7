// Transparent egress at the agent level (issue 21, steps 1 to 3) on a real microVM: the guest
// kernel has bpf(2), and PROXY_LISTEN in transparent mode makes a program that knows nothing of
// proxies (busybox wget, no proxy variables) reach the host's handler, which learns where the
// program meant to go. Nothing here connects anywhere real: the handler answers itself, and the
// destination (203.0.113.5, TEST-NET-3) is only named. Step 3: the guest's DNS queries reach
// the agent's responder and, through RESOLVE, the host's EgressDns.
import { describe, expect, it, vi } from "vitest";
import type { ProxyConnInfo } from "../../src/agent/messages.js";
import type { TcpStream } from "../../src/agent/streams.js";
import { EgressDns } from "../../src/net/dns.js";
import { EgressPolicy } from "../../src/net/policy.js";
import { useBusyboxVm } from "../helpers/vm.js";

const env = useBusyboxVm();

describe("transparent egress in the guest", () => {
  it("the guest kernel has bpf(2)", async () => {
    // The sysctl exists only with CONFIG_BPF_SYSCALL; 2 is BPF_UNPRIV_DEFAULT_OFF's value.
    const r = await env.vm.exec({ argv: ["cat", "/proc/sys/kernel/unprivileged_bpf_disabled"] });
    expect(r.stderr.toString()).toBe("");
    expect(r.stdout.toString()).toBe("2\n");
  });

  it("has the steering program loaded from boot (in the snapshot), before any egress is armed", async () => {
    // The agent (PID 1) holds the program, its link and its map; arming only fills the map.
    const fds = await env.vm.exec({ argv: ["ls", "-l", "/proc/1/fd"] });
    const kinds = [...fds.stdout.toString().matchAll(/anon_inode:bpf[-_](prog|link|map)/g)].map((m) => m[1]);
    expect(new Set(kinds), fds.stdout.toString()).toEqual(new Set(["prog", "link", "map"]));
  });

  it("steers a plain connect to any address to the host handler, with its destination, until stopped", { timeout: 120_000 }, async () => {
    const vm = env.vm;
    const agent = vm.machine.agent;
    const routes = async () => (await vm.exec({ argv: ["ip", "route", "show", "table", "local"] })).stdout.toString();
    const before = await routes();
    const unreachable = await vm.exec({ argv: ["wget", "-q", "-O", "-", "http://203.0.113.5:443/x"] });
    expect(unreachable.exitCode).not.toBe(0);
    expect(unreachable.stderr.toString()).toMatch(/unreachable/i);

    const seen: { info: ProxyConnInfo; request: string }[] = [];
    const handle = (stream: TcpStream, info: ProxyConnInfo) => {
      let request = "";
      stream.onData = (chunk) => {
        stream.consumed(chunk.length);
        request += chunk.toString("latin1");
        if (!request.includes("\r\n\r\n")) return;
        seen.push({ info, request: request.split("\r\n")[0]! });
        void stream
          .write(Buffer.from("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nhi\n"))
          .then(() => stream.closeWrite())
          .catch(() => {});
      };
      stream.done.catch(() => {});
    };
    const port = await agent.proxyListen({ port: 0, mode: "transparent" }, handle);
    expect(port).toBeGreaterThan(0);
    try {
      const got = await vm.exec({ argv: ["wget", "-q", "-O", "-", "http://203.0.113.5:443/x"] });
      expect(got.stderr.toString()).toBe("");
      expect(got.stdout.toString()).toBe("hi\n");
      expect(seen).toEqual([{ info: { peerPort: expect.any(Number), dst: { address: "203.0.113.5", port: 443 } }, request: "GET /x HTTP/1.1" }]);
      expect(await routes()).toMatch(/^local default dev lo/m);

      // The guest's own loopback is not steered: a closed port there refuses.
      const own = await vm.exec({ argv: ["wget", "-q", "-O", "-", "http://127.0.0.1:1/"] });
      expect(own.stderr.toString()).toMatch(/refused/i);
      expect(seen).toHaveLength(1);
    } finally {
      await agent.proxyStop();
    }
    const after = await vm.exec({ argv: ["wget", "-q", "-O", "-", "http://203.0.113.5:443/x"] });
    expect(after.stderr.toString()).toMatch(/unreachable/i);
    expect(await routes()).toBe(before);
    expect(seen).toHaveLength(1);
  });

  it("answers the guest's DNS from the host's policy: an allowed name gets a fake address its connections carry, another NXDOMAIN with no lookup", { timeout: 180_000 }, async () => {
    const vm = env.vm;
    const agent = vm.machine.agent;
    const port = 8080;
    const lookups = vi.fn(async (name: string) => {
      throw Object.assign(new Error(`getaddrinfo ENOTFOUND ${name}`), { code: "ENOTFOUND" });
    });
    const dns = new EgressDns(new EgressPolicy({ allow: [`web.test:${port}`, `127.0.0.1:${port}`], hosts: { "web.test": "127.0.0.1" } }), { resolve: lookups });
    const asked: string[] = [];
    const seen: ProxyConnInfo[] = [];
    const handle = (stream: TcpStream, info: ProxyConnInfo) => {
      seen.push(info);
      let request = "";
      stream.onData = (chunk) => {
        stream.consumed(chunk.length);
        request += chunk.toString("latin1");
        if (!request.includes("\r\n\r\n")) return;
        void stream
          .write(Buffer.from(`HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n`))
          .then(() => stream.closeWrite())
          .catch(() => {});
      };
      stream.done.catch(() => {});
    };
    await agent.proxyListen(
      {
        port: 0,
        mode: "transparent",
        onResolve: (req) => {
          asked.push(`${req.name}/${req.qtype}`);
          return dns.answer(req);
        },
      },
      handle,
    );
    try {
      // Any server address works, loopback included: port 53 belongs to the agent.
      for (const server of ["8.8.8.8", "127.0.0.1"]) {
        const r = await vm.exec({ argv: ["nslookup", "web.test", server] });
        expect(r.stdout.toString()).toMatch(/Address:\s+198\.1[89]\.\d+\.\d+/);
      }
      const fake = /Address:\s+(198\.1[89]\.\d+\.\d+)/.exec((await vm.exec({ argv: ["nslookup", "web.test", "8.8.8.8"] })).stdout.toString())![1]!;
      expect(asked).toContain("web.test/1");

      // A connection to the fake address carries the name.
      const got = await vm.exec({ argv: ["wget", "-q", "-O", "-", `http://${fake}:${port}/`] });
      expect(got.stderr.toString()).toBe("");
      expect(got.stdout.toString()).toBe("ok\n");
      expect(seen.at(-1)).toEqual({ peerPort: expect.any(Number), dst: { address: fake, port }, name: "web.test" });
      // And so does one through the libc resolver, whatever the image's resolv.conf says.
      const byName = await vm.exec({ argv: ["wget", "-q", "-O", "-", `http://web.test:${port}/`] });
      expect(byName.stderr.toString()).toBe("");
      expect(byName.stdout.toString()).toBe("ok\n");
      expect(seen.at(-1)).toEqual({ peerPort: expect.any(Number), dst: { address: fake, port }, name: "web.test" });

      // A name off the allowlist: NXDOMAIN, and the host resolved nothing.
      const evil = await vm.exec({ argv: ["nslookup", "evil.test", "8.8.8.8"] });
      expect(evil.exitCode).not.toBe(0);
      expect(evil.stdout.toString() + evil.stderr.toString()).toMatch(/NXDOMAIN/);
      expect(asked).toContain("evil.test/1");
      expect(lookups).not.toHaveBeenCalled();
    } finally {
      await agent.proxyStop();
    }
  });
});
