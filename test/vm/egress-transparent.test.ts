// Transparent egress at the agent level (issue 21, steps 1 and 2) on a real microVM: the guest
// kernel has bpf(2), and PROXY_LISTEN in transparent mode makes a program that knows nothing of
// proxies (busybox wget, no proxy variables) reach the host's handler, which learns where the
// program meant to go. Nothing here connects anywhere real: the handler answers itself, and the
// destination (203.0.113.5, TEST-NET-3) is only named.
import { describe, expect, it } from "vitest";
import type { ProxyConnInfo } from "../../src/agent/messages.js";
import type { TcpStream } from "../../src/agent/streams.js";
import { useBusyboxVm } from "../helpers/vm.js";

const env = useBusyboxVm();

describe("transparent egress in the guest", () => {
  it("the guest kernel has bpf(2)", async () => {
    // The sysctl exists only with CONFIG_BPF_SYSCALL; 2 is BPF_UNPRIV_DEFAULT_OFF's value.
    const r = await env.vm.exec({ argv: ["cat", "/proc/sys/kernel/unprivileged_bpf_disabled"] });
    expect(r.stderr.toString()).toBe("");
    expect(r.stdout.toString()).toBe("2\n");
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
});
