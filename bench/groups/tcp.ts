/** Benchmark group `tcp`: TCP through vm.exposeTcp, beside the agent's own round trip. */
import { type Vm } from "../../src/runtime/vm.js";
import { MiB, connectTcp, guestSetup } from "../util.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const tcpGroup: BenchGroup = {
  name: "tcp",
  metrics: ["ping_roundtrip_ms", "tcp_forward_rtt_ms", "tcp_forward_mib_per_s", "tcp_forward_upload_mib_per_s"],
  sharedVm: true,
  run: async (ctx) => tcpBenchmarks(ctx, await ctx.sharedVm()),
};

/**
 * TCP through vm.exposeTcp: 1-byte round trips to an echo server in the guest (busybox nc -e
 * cat; compare with ping_roundtrip_ms, the agent's own round trip), and bulk transfers each way.
 */
async function tcpBenchmarks(ctx: BenchContext, v: Vm): Promise<void> {
  const { quick, record } = ctx;
  const size = 64 * MiB;
  await guestSetup(v, `mkdir -p /www && head -c ${size} /dev/zero > /www/big && httpd -p 127.0.0.1:8080 -h /www && { nc -ll -p 7000 -e cat & sleep 0.3; }`);
  const echo = await v.exposeTcp(0, 7000);
  try {
    const s = await connectTcp(echo.localAddr);
    s.setNoDelay(true);
    const one = Buffer.from("x");
    const rtt = () =>
      new Promise<number>((res) => {
        const t0 = performance.now();
        s.once("data", () => res(performance.now() - t0));
        s.write(one);
      });
    for (let i = 0; i < 50; i++) await Promise.all([rtt(), v.machine.agent.ping()]);
    // The agent's own round trip (its peer) is sampled in the same loop, one of each in turn, so
    // that both see the same machine: the ratio of the two is what travels between machines.
    const samples: number[] = [];
    const pings: number[] = [];
    for (let i = 0; i < (quick ? 300 : 1000); i++) {
      pings.push(await v.machine.agent.ping());
      samples.push(await rtt());
    }
    record("ping_roundtrip_ms", pings);
    record("tcp_forward_rtt_ms", samples);
    s.destroy();
  } finally {
    await echo.stop();
  }
  const web = await v.exposeTcp(0, 8080);
  try {
    const down: number[] = [];
    for (let i = 0; i < (quick ? 2 : 5); i++) {
      const t0 = performance.now();
      const s = await connectTcp(web.localAddr);
      let got = 0;
      await new Promise<void>((res, rej) => {
        s.on("data", (c: Buffer) => (got += c.length));
        s.on("end", () => res());
        s.on("error", rej);
        s.write("GET /big HTTP/1.0\r\n\r\n");
      });
      if (got < size) throw new Error(`downloaded ${got} of ${size} bytes`);
      down.push(size / MiB / ((performance.now() - t0) / 1000));
    }
    record("tcp_forward_mib_per_s", down, "MiB/s");
  } finally {
    await web.stop();
    await v.exec({ argv: ["rm", "-f", "/www/big"] });
  }
  const up: number[] = [];
  const chunk = Buffer.alloc(MiB, 0x62);
  // A sink that reads in 64 KiB pieces (dd, into the guest's RAM-backed /tmp) and, once the
  // client half-closes, answers with how many bytes arrived. (busybox wc -c reads a socket at
  // ~25 MiB/s under TCG, so it would measure itself, not the forwarder.)
  await v.writeFile("/tmp/sink.sh", "#!/bin/sh\ndd of=/tmp/up bs=65536 2>/dev/null; stat -c %s /tmp/up; rm -f /tmp/up\n", { mode: 0o755 });
  await guestSetup(v, "nc -ll -p 7001 -e /tmp/sink.sh & sleep 0.3");
  const sink = await v.exposeTcp(0, 7001);
  try {
    for (let i = 0; i < (quick ? 2 : 5); i++) {
      const t0 = performance.now();
      const s = await connectTcp(sink.localAddr);
      const answer = await new Promise<string>((res, rej) => {
        let text = "";
        s.on("data", (c: Buffer) => (text += c.toString()));
        s.on("end", () => res(text));
        s.on("error", rej);
        let sent = 0;
        const pump = () => {
          while (sent < size) {
            sent += MiB;
            if (!s.write(chunk)) return void s.once("drain", pump);
          }
          s.end();
        };
        pump();
      });
      if (Number(answer.trim()) !== size) throw new Error(`the guest counted "${answer.trim()}" bytes, expected ${size}`);
      up.push(size / MiB / ((performance.now() - t0) / 1000));
    }
  } finally {
    await sink.stop();
  }
  record("tcp_forward_upload_mib_per_s", up, "MiB/s");
}
