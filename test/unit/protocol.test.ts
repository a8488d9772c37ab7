import { describe, expect, it } from "vitest";
import { PassThrough } from "node:stream";
import {
  AGENT_STREAM_BASE,
  encodeFrame,
  FieldWriter,
  Fields,
  FrameDecoder,
  type Frame,
  HEADER_SIZE,
  MAX_PAYLOAD,
  Msg,
  FLAG_EOF,
  Tag,
  INITIAL_WINDOW,
  MAX_RECORD,
  RecordDecoder,
} from "../../src/agent/protocol.js";
import { dirEventOf, fileInfoOf } from "../../src/agent/fs.js";
import { AgentClient } from "../../src/agent/client.js";
import { proxyConnDst } from "../../src/agent/connection.js";
import type { ProxyConnInfo } from "../../src/agent/messages.js";
import { AgentError } from "../../src/errors.js";

describe("frame codec", () => {
  it("round-trips frames split at every byte boundary", () => {
    const frames = [
      encodeFrame(Msg.PING, 7, Buffer.from("abc")),
      encodeFrame(Msg.DATA, 0xffffffff, Buffer.alloc(0), 1 | FLAG_EOF),
      encodeFrame(Msg.EXEC, 3, Buffer.alloc(70_000, 0x5a)),
    ];
    const wire = Buffer.concat(frames);
    for (const step of [1, 5, 12, 13, 4096, wire.length]) {
      const d = new FrameDecoder();
      const got = [];
      for (let i = 0; i < wire.length; i += step) got.push(...d.push(wire.subarray(i, i + step)));
      expect(got.map((f) => [f.type, f.stream, f.flags, f.payload.length])).toEqual([
        [Msg.PING, 7, 0, 3],
        [Msg.DATA, 0xffffffff, 1 | FLAG_EOF, 0],
        [Msg.EXEC, 3, 0, 70_000],
      ]);
      expect(got[0]!.payload.toString()).toBe("abc");
      expect(d.pending).toBe(0);
    }
  });

  it("writes the documented little-endian header", () => {
    const f = encodeFrame(Msg.WINDOW, 0x01020304, Buffer.from([9, 9]), 2);
    expect([...f.subarray(0, HEADER_SIZE)]).toEqual([2, 0, 0, 0, Msg.WINDOW, 2, 0, 0, 4, 3, 2, 1]);
  });

  it("keeps a truncated frame pending instead of inventing one", () => {
    const d = new FrameDecoder();
    const f = encodeFrame(Msg.PONG, 1, Buffer.from("hello"));
    expect(d.push(f.subarray(0, f.length - 1))).toEqual([]);
    expect(d.pending).toBe(f.length - 1);
    expect(d.push(f.subarray(f.length - 1))).toHaveLength(1);
  });

  it("rejects a header announcing more than MAX_PAYLOAD and stays failed", () => {
    const d = new FrameDecoder();
    const h = Buffer.alloc(HEADER_SIZE);
    h.writeUInt32LE(MAX_PAYLOAD + 1, 0);
    expect(() => d.push(h)).toThrow(/announcing/);
    expect(() => d.push(Buffer.alloc(1))).toThrow(AgentError);
  });

  it("refuses to encode an oversized payload", () => {
    expect(() => encodeFrame(Msg.DATA, 1, Buffer.alloc(MAX_PAYLOAD + 1))).toThrow(/exceeds/);
  });
});

describe("field codec", () => {
  it("round-trips repeated and typed fields and skips unknown tags", () => {
    const p = new FieldWriter()
      .bytes(Tag.exec.argv, "echo")
      .bytes(Tag.exec.argv, "hi there")
      .bytes(99, Buffer.from("from the future"))
      .u64(Tag.exec.timeoutMs, 5000)
      .u32(Tag.exec.uid, 1000)
      .finish();
    const f = new Fields(p);
    expect(f.all(Tag.exec.argv).map(String)).toEqual(["echo", "hi there"]);
    expect(f.u64(Tag.exec.timeoutMs)).toBe(5000n);
    expect(f.u32(Tag.exec.uid)).toBe(1000);
    expect(f.string(Tag.exec.cwd)).toBeUndefined();
  });

  it("rejects truncated fields and wrong widths", () => {
    const p = new FieldWriter().bytes(1, "abcdef").finish();
    expect(() => new Fields(p.subarray(0, p.length - 2))).toThrow(/announces/);
    expect(() => new Fields(p.subarray(0, 3))).toThrow(/truncated/);
    expect(() => new Fields(new FieldWriter().u16(1, 7).finish()).u32(1)).toThrow(/expected 4 bytes/);
  });
});

describe("client against a hostile peer", () => {
  function connected() {
    const toAgent = new PassThrough();
    const fromAgent = new PassThrough();
    // A duplex whose writes go to `toAgent` and whose reads come from `fromAgent`.
    const ch = new (class extends PassThrough {
      override _write(c: Buffer, e: BufferEncoding, cb: () => void) {
        toAgent.write(c, e);
        cb();
      }
    })();
    fromAgent.on("data", (d) => ch.push(d));
    const fatal: Error[] = [];
    const client = new AgentClient(ch, { onFatal: (e) => fatal.push(e) });
    return { client, fromAgent, toAgent, fatal };
  }

  it("fails the connection when the agent overruns a stream's window", async () => {
    const { client, fromAgent, fatal } = connected();
    const s = client.exec({ argv: ["cat"], env: [] });
    fromAgent.write(encodeFrame(Msg.DATA, s.id, Buffer.alloc(INITIAL_WINDOW + 1), 1));
    await expect(s.wait()).rejects.toThrow(/window/);
    expect(fatal[0]).toBeInstanceOf(AgentError);
  });

  it("fails the connection on an oversized frame header", async () => {
    const { client, fromAgent, fatal } = connected();
    const p = client.ping();
    const h = Buffer.alloc(HEADER_SIZE);
    h.writeUInt32LE(0xffffffff, 0);
    fromAgent.write(h);
    await expect(p).rejects.toThrow(/announcing/);
    expect(fatal).toHaveLength(1);
  });

  it("takes PROXY_CONN streams only on the agent's ids, only while listening, and never twice on one id", async () => {
    const { client, fromAgent, toAgent, fatal } = connected();
    const sent: { type: number; stream: number }[] = [];
    const dec = new FrameDecoder();
    toAgent.on("data", (d: Buffer) => sent.push(...dec.push(d).map((f) => ({ type: f.type, stream: f.stream }))));
    const conn = (id: number) => encodeFrame(Msg.PROXY_CONN, id, new FieldWriter().u16(Tag.proxyConn.peerPort, 40000).finish());
    const tick = () => new Promise((r) => setImmediate(r));
    // Not listening: the stream is cancelled, the connection goes on.
    fromAgent.write(conn(AGENT_STREAM_BASE));
    await tick();
    expect(sent).toContainEqual({ type: Msg.CANCEL, stream: AGENT_STREAM_BASE });
    expect(fatal).toHaveLength(0);
    // Listening: the handler gets the stream, with the guest's port; the agent's OK ends it.
    const got: { id: number; peerPort: number }[] = [];
    const listening = client.proxyListen({ port: 3128, env: ["http_proxy=http://127.0.0.1:3128"] }, (s, info) => got.push({ id: s.id, peerPort: info.peerPort }));
    const listenId = sent.find((f) => f.type === Msg.PROXY_LISTEN)!.stream;
    expect(listenId).toBeLessThan(AGENT_STREAM_BASE);
    fromAgent.write(encodeFrame(Msg.OK, listenId, new FieldWriter().u16(Tag.proxyListenOk.port, 3128).finish()));
    await expect(listening).resolves.toBe(3128);
    fromAgent.write(conn(AGENT_STREAM_BASE + 1));
    await tick();
    expect(got).toEqual([{ id: AGENT_STREAM_BASE + 1, peerPort: 40000 }]);
    expect(client.openStreams).toBe(1);
    // The same id again while it is open, or a host id: the agent is broken.
    fromAgent.write(conn(AGENT_STREAM_BASE + 1));
    await tick();
    expect(fatal[0]?.message).toMatch(/PROXY_CONN on stream 2147483649, which is open/);
    const second = connected();
    second.fromAgent.write(conn(7));
    await tick();
    expect(second.fatal[0]?.message).toMatch(/below the agent's ids/);
  });

  it("sends PROXY_LISTEN's transparent mode only when asked, and hands the handler PROXY_CONN's destination", async () => {
    const { client, fromAgent, toAgent, fatal } = connected();
    const sent: Frame[] = [];
    const dec = new FrameDecoder();
    toAgent.on("data", (d: Buffer) => sent.push(...dec.push(d)));
    const tick = () => new Promise((r) => setImmediate(r));
    const got: ProxyConnInfo[] = [];
    const listening = client.proxyListen({ port: 0, mode: "transparent" }, (_s, info) => got.push(info));
    const req = sent.find((f) => f.type === Msg.PROXY_LISTEN)!;
    const fields = new Fields(req.payload, "PROXY_LISTEN");
    expect([fields.u16(Tag.proxyListen.port), fields.u8(Tag.proxyListen.mode)]).toEqual([0, 1]);
    fromAgent.write(encodeFrame(Msg.OK, req.stream, new FieldWriter().u16(Tag.proxyListenOk.port, 41234).finish()));
    await expect(listening).resolves.toBe(41234);
    const conn = (id: number, addr: number[], port: number) =>
      encodeFrame(Msg.PROXY_CONN, id, new FieldWriter().u16(Tag.proxyConn.peerPort, 40000).bytes(Tag.proxyConn.dstAddr, Buffer.from(addr)).u16(Tag.proxyConn.dstPort, port).finish());
    fromAgent.write(conn(AGENT_STREAM_BASE, [203, 0, 113, 5], 443));
    fromAgent.write(conn(AGENT_STREAM_BASE + 1, [0x20, 0x01, 0x0d, 0xb8, ...Array(11).fill(0), 1], 22));
    await tick();
    expect(got).toEqual([
      { peerPort: 40000, dst: { address: "203.0.113.5", port: 443 } },
      { peerPort: 40000, dst: { address: "2001:db8::1", port: 22 } },
    ]);
    expect(fatal).toHaveLength(0);

    // Proxy mode sends no mode field (an older agent sees today's request).
    const plain = connected();
    const plainSent: Frame[] = [];
    const plainDec = new FrameDecoder();
    plain.toAgent.on("data", (d: Buffer) => plainSent.push(...plainDec.push(d)));
    void plain.client.proxyListen({ port: 3128 }, () => {}).catch(() => {});
    const plainReq = plainSent.find((f) => f.type === Msg.PROXY_LISTEN)!;
    expect(new Fields(plainReq.payload, "PROXY_LISTEN").u8(Tag.proxyListen.mode)).toBeUndefined();
  });

  it("answers RESOLVE with the handler's verdict on the same id, SERVFAIL without a handler or when it fails, and passes PROXY_CONN's name", async () => {
    const { client, fromAgent, toAgent, fatal } = connected();
    const sent: Frame[] = [];
    const dec = new FrameDecoder();
    toAgent.on("data", (d: Buffer) => sent.push(...dec.push(d)));
    const tick = () => new Promise((r) => setImmediate(r));
    const resolve = (id: number, name: string, qtype: number) => encodeFrame(Msg.RESOLVE, id, new FieldWriter().bytes(Tag.resolve.name, name).u16(Tag.resolve.qtype, qtype).finish());
    const answerOn = (id: number) => {
      const f = sent.find((x) => x.type === Msg.OK && x.stream === id);
      if (!f) return undefined;
      const fields = new Fields(f.payload, "RESOLVE OK");
      return { verdict: fields.u8(Tag.resolveOk.verdict), ttl: fields.u32(Tag.resolveOk.ttl) };
    };
    // Before any listen: SERVFAIL, TTL 0.
    fromAgent.write(resolve(AGENT_STREAM_BASE, "web.test", 1));
    await tick();
    expect(answerOn(AGENT_STREAM_BASE)).toEqual({ verdict: 3, ttl: 0 });

    const asked: string[] = [];
    const got: ProxyConnInfo[] = [];
    const listening = client.proxyListen(
      {
        port: 0,
        mode: "transparent",
        onResolve: async (req) => {
          asked.push(`${req.name}/${req.qtype}`);
          if (req.name === "boom.test") throw new Error("boom");
          return req.name === "web.test" ? { verdict: "allow", ttl: 30, ports: [80, 443] } : { verdict: "nxdomain", ttl: 5 };
        },
      },
      (_s, info) => got.push(info),
    );
    const req = sent.find((f) => f.type === Msg.PROXY_LISTEN)!;
    fromAgent.write(encodeFrame(Msg.OK, req.stream, new FieldWriter().u16(Tag.proxyListenOk.port, 41234).finish()));
    await listening;
    fromAgent.write(resolve(AGENT_STREAM_BASE + 1, "web.test", 28));
    fromAgent.write(resolve(AGENT_STREAM_BASE + 2, "evil.test", 1));
    fromAgent.write(resolve(AGENT_STREAM_BASE + 3, "boom.test", 1));
    await tick();
    await tick();
    expect(asked).toEqual(["web.test/28", "evil.test/1", "boom.test/1"]);
    expect(answerOn(AGENT_STREAM_BASE + 1)).toEqual({ verdict: 0, ttl: 30 });
    const ports = new Fields(sent.find((x) => x.type === Msg.OK && x.stream === AGENT_STREAM_BASE + 1)!.payload, "OK");
    expect(ports.u16(Tag.resolveOk.ports)).toBe(80);
    expect(answerOn(AGENT_STREAM_BASE + 2)).toEqual({ verdict: 1, ttl: 5 });
    expect(answerOn(AGENT_STREAM_BASE + 3)).toEqual({ verdict: 3, ttl: 0 });
    // A RESOLVE keeps no stream open.
    expect(client.openStreams).toBe(0);
    // PROXY_CONN's name field reaches the handler.
    fromAgent.write(
      encodeFrame(
        Msg.PROXY_CONN,
        AGENT_STREAM_BASE + 4,
        new FieldWriter().u16(Tag.proxyConn.peerPort, 40000).bytes(Tag.proxyConn.dstAddr, Buffer.from([198, 18, 0, 1])).u16(Tag.proxyConn.dstPort, 80).bytes(Tag.proxyConn.name, "web.test").finish(),
      ),
    );
    await tick();
    expect(got).toEqual([{ peerPort: 40000, dst: { address: "198.18.0.1", port: 80 }, name: "web.test" }]);
    // A RESOLVE on a host id is a broken agent.
    fromAgent.write(resolve(9, "web.test", 1));
    await tick();
    expect(fatal[0]?.message).toMatch(/RESOLVE on stream 9, below the agent's ids/);
  });

  it("formats PROXY_CONN destinations and refuses malformed ones", () => {
    expect(proxyConnDst(undefined, undefined)).toBeUndefined();
    expect(proxyConnDst(Buffer.from([10, 0, 2, 2]), 8080)).toEqual({ address: "10.0.2.2", port: 8080 });
    expect(proxyConnDst(Buffer.alloc(16), 1)?.address).toBe("::");
    const mapped = Buffer.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4]);
    expect(proxyConnDst(mapped, 1)?.address).toBe("::ffff:102:304");
    expect(proxyConnDst(Buffer.from([0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]), 1)?.address).toBe("1:0:1::1:0:1");
    expect(() => proxyConnDst(Buffer.from([1, 2, 3]), 1)).toThrow(/3 bytes/);
    expect(() => proxyConnDst(Buffer.from([1, 2, 3, 4]), undefined)).toThrow(/no dst_port/);
  });

  it("ignores frames for streams it does not know", async () => {
    const { client, fromAgent, fatal } = connected();
    fromAgent.write(encodeFrame(Msg.DATA, 12345, Buffer.from("stray"), 1));
    const p = client.ping(Buffer.from("x"));
    fromAgent.write(encodeFrame(Msg.PONG, 1, Buffer.from("x")));
    await expect(p).resolves.toBeGreaterThanOrEqual(0);
    expect(fatal).toHaveLength(0);
  });

  /** The frames the host sent so far, decoded. */
  function sentFrames(toAgent: PassThrough): { type: number; stream: number; payload: Buffer }[] {
    const frames: { type: number; stream: number; payload: Buffer }[] = [];
    const dec = new FrameDecoder();
    for (let chunk: Buffer | null; (chunk = toAgent.read() as Buffer | null) !== null; ) frames.push(...dec.push(chunk));
    return frames;
  }
  const helloOk = (version = 5) => new FieldWriter().u16(Tag.helloOk.version, version).bytes(Tag.helloOk.agentVersion, "t").finish();
  const tick = () => new Promise((r) => setImmediate(r));

  it("sends HELLO on stream 0 and requests on fresh ids; HELLO and PING open no stream", async () => {
    const { client, fromAgent, toAgent, fatal } = connected();
    const hello = client.hello();
    const ping = client.ping(Buffer.from("p"));
    const bench = client.spawnBench(["true"], 1);
    const exec = client.exec({ argv: ["true"], env: [] });
    expect(sentFrames(toAgent).map((f) => [f.type, f.stream])).toEqual([
      [Msg.HELLO, 0],
      [Msg.PING, 1],
      [Msg.SPAWN_BENCH, 2],
      [Msg.EXEC, 3],
    ]);
    expect(client.openStreams).toBe(2);
    // HELLO_OK answers the HELLO whatever stream id it carries; a PONG on an exec's id is ignored.
    fromAgent.write(encodeFrame(Msg.HELLO_OK, 9, helloOk()));
    fromAgent.write(encodeFrame(Msg.PONG, exec.id, Buffer.from("p")));
    fromAgent.write(encodeFrame(Msg.PONG, 1, Buffer.from("p")));
    await expect(hello).resolves.toMatchObject({ version: 5, agentVersion: "t" });
    await expect(ping).resolves.toBeGreaterThanOrEqual(0);
    fromAgent.write(encodeFrame(Msg.OK, 2, new FieldWriter().bytes(Tag.ok.samplesNs, Buffer.alloc(8)).finish()));
    await expect(bench).resolves.toEqual([0]);
    expect(client.openStreams).toBe(1);
    expect(fatal).toHaveLength(0);
  });

  it("times out a HELLO or a PING without failing the connection, and drops the late answer", async () => {
    const { client, fromAgent, toAgent, fatal } = connected();
    await expect(client.hello({ timeoutMs: 10 })).rejects.toMatchObject({ code: "AGENT_HELLO_TIMEOUT", message: "the agent did not answer HELLO within 10 ms" });
    await expect(client.ping(Buffer.from("a"), { timeoutMs: 10 })).rejects.toMatchObject({ code: "AGENT_PING_TIMEOUT", message: "the agent did not answer a ping within 10 ms" });
    expect(sentFrames(toAgent).map((f) => f.type)).toEqual([Msg.HELLO, Msg.PING]);
    fromAgent.write(encodeFrame(Msg.HELLO_OK, 0, helloOk()));
    fromAgent.write(encodeFrame(Msg.PONG, 1, Buffer.from("a")));
    await tick();
    expect(fatal).toHaveLength(0);
    // The connection goes on: the next ping gets the next id and its answer.
    const p = client.ping(Buffer.from("b"));
    fromAgent.write(encodeFrame(Msg.PONG, 2, Buffer.from("b")));
    await expect(p).resolves.toBeGreaterThanOrEqual(0);
  });

  it("rejects a PONG that differs from its PING, and fails the connection on a HELLO_OK of another version nobody waits for", async () => {
    const { client, fromAgent, fatal } = connected();
    const p = client.ping(Buffer.from("same"));
    fromAgent.write(encodeFrame(Msg.PONG, 1, Buffer.from("diff")));
    await expect(p).rejects.toMatchObject({ code: "AGENT_PROTOCOL", message: "PONG payload differs from PING" });
    expect(fatal).toHaveLength(0);
    fromAgent.write(encodeFrame(Msg.HELLO_OK, 0, helloOk()));
    await tick();
    expect(fatal).toHaveLength(0);
    fromAgent.write(encodeFrame(Msg.HELLO_OK, 0, helloOk(4)));
    await tick();
    expect(fatal[0]).toMatchObject({ code: "AGENT_VERSION", message: "agent chose protocol version 4, host speaks 5" });
  });

  it("fails every call on a failed connection: HELLO and PING at once, requests by rejecting", async () => {
    const { client, fatal } = connected();
    const pending = client.ping();
    client.close();
    expect(fatal[0]).toMatchObject({ code: "AGENT_CLOSED" });
    await expect(pending).rejects.toMatchObject({ code: "AGENT_CLOSED" });
    expect(() => client.hello()).toThrow(/was closed/);
    expect(() => client.ping()).toThrow(/was closed/);
    expect(() => client.exec({ argv: ["true"], env: [] })).toThrow(/was closed/);
    await expect(client.startWorkload({ argv: ["w"], env: [] })).rejects.toMatchObject({ code: "AGENT_CLOSED" });
    expect(client.openStreams).toBe(0);
  });

  // ---- FS_* (version 5) --------------------------------------------------------------------

  const record = (fields: Buffer) => {
    const len = Buffer.alloc(4);
    len.writeUInt32LE(fields.length, 0);
    return Buffer.concat([len, fields]);
  };
  const fileFields = (path: string, type = 1, extra: (w: FieldWriter) => FieldWriter = (w) => w) =>
    extra(
      new FieldWriter()
        .bytes(Tag.fileInfo.path, path)
        .bytes(Tag.fileInfo.name, path.split("/").pop() || "/")
        .u8(Tag.fileInfo.type, type)
        .u64(Tag.fileInfo.size, 5)
        .u32(Tag.fileInfo.mode, 0o104755)
        .u32(Tag.fileInfo.uid, 1000)
        .u32(Tag.fileInfo.gid, 100),
    )
      .bytes(Tag.fileInfo.mtimeSec, (() => {
        const b = Buffer.alloc(8);
        b.writeBigInt64LE(-2n, 0);
        return b;
      })())
      .u32(Tag.fileInfo.mtimeNsec, 500_000)
      .finish();

  it("decodes a file's fields, a symlink's target and watch events, and rejects what is out of range", () => {
    const f = fileInfoOf(new Fields(fileFields("/a/b")), "t");
    expect(f).toEqual({ path: "/a/b", name: "b", type: "file", size: 5, mode: 0o4755, uid: 1000, gid: 100, mtimeMs: -1999.5 });
    const l = fileInfoOf(new Fields(fileFields("/l", 3, (w) => w.bytes(Tag.fileInfo.target, "../t"))), "t");
    expect(l).toMatchObject({ type: "symlink", symlinkTarget: "../t" });
    expect(fileInfoOf(new Fields(fileFields("/d", 2, (w) => w.bytes(Tag.fileInfo.target, "x"))), "t").symlinkTarget).toBeUndefined();
    expect(() => fileInfoOf(new Fields(fileFields("/x", 4)), "t")).toThrow(/file type 4/);
    expect(() => fileInfoOf(new Fields(new FieldWriter().u8(Tag.fileInfo.type, 1).finish()), "t")).toThrow(/missing/);
    expect(dirEventOf(new FieldWriter().u8(Tag.fsEvent.kind, 4).bytes(Tag.fsEvent.name, "sub/f").finish())).toEqual({ type: "rename", name: "sub/f" });
    for (const kind of [0, 6]) expect(() => dirEventOf(new FieldWriter().u8(Tag.fsEvent.kind, kind).bytes(Tag.fsEvent.name, "f").finish())).toThrow(/kind/);
  });

  it("reassembles records split anywhere, and refuses an oversized one", () => {
    const recs = [Buffer.from("one"), Buffer.alloc(0), Buffer.from("three three")];
    const wire = Buffer.concat(recs.map(record));
    for (let cut = 0; cut <= wire.length; cut++) {
      const d = new RecordDecoder("t");
      const got = [...d.push(wire.subarray(0, cut)), ...d.push(wire.subarray(cut))];
      expect(got.map(String)).toEqual(recs.map(String));
      expect(d.pending).toBe(0);
    }
    const d = new RecordDecoder("t");
    expect(d.push(wire.subarray(0, 5))).toEqual([]);
    expect(d.pending).toBe(5);
    const big = Buffer.alloc(4);
    big.writeUInt32LE(MAX_RECORD + 1, 0);
    expect(() => new RecordDecoder("t").push(big)).toThrow(/record of/);
  });

  it("sends FS requests with their fields, and lists entries streamed across DATA frames", async () => {
    const { client, fromAgent, toAgent, fatal } = connected();
    const stat = client.stat("/a/b", true);
    const list = client.list("/a", 2);
    const mk = client.mkdir("/a/n", { mode: 0o700, parents: true, uid: 5 });
    const mv = client.rename("/a/x", "/a/y");
    const rm = client.remove("/a/z", true);
    const sent = sentFrames(toAgent);
    expect(sent.map((f) => f.type)).toEqual([Msg.FS_STAT, Msg.FS_LIST, Msg.FS_MKDIR, Msg.FS_RENAME, Msg.FS_REMOVE]);
    const fields = sent.map((f) => new Fields(f.payload));
    expect([fields[0]!.string(Tag.fsStat.path), fields[0]!.u8(Tag.fsStat.follow)]).toEqual(["/a/b", 1]);
    expect([fields[1]!.u32(Tag.fsList.depth), fields[1]!.u32(Tag.fsList.maxEntries)]).toEqual([2, 100_000]);
    expect([fields[2]!.u32(Tag.fsMkdir.mode), fields[2]!.u8(Tag.fsMkdir.parents), fields[2]!.u32(Tag.fsMkdir.uid), fields[2]!.u32(Tag.fsMkdir.gid)]).toEqual([0o700, 1, 5, undefined]);
    expect([fields[3]!.string(Tag.fsRename.from), fields[3]!.string(Tag.fsRename.to)]).toEqual(["/a/x", "/a/y"]);
    expect(fields[4]!.u8(Tag.fsPathRecursive.recursive)).toBe(1);

    fromAgent.write(encodeFrame(Msg.OK, sent[0]!.stream, fileFields("/a/b")));
    await expect(stat).resolves.toMatchObject({ path: "/a/b", type: "file" });
    const wire = Buffer.concat([record(fileFields("/a/1")), record(fileFields("/a/2", 2))]);
    fromAgent.write(encodeFrame(Msg.DATA, sent[1]!.stream, wire.subarray(0, 7), 1));
    fromAgent.write(encodeFrame(Msg.DATA, sent[1]!.stream, wire.subarray(7), 1));
    fromAgent.write(encodeFrame(Msg.DATA, sent[1]!.stream, undefined, 1 | FLAG_EOF));
    fromAgent.write(encodeFrame(Msg.OK, sent[1]!.stream, new FieldWriter().u64(Tag.fsListOk.count, 2).finish()));
    expect((await list.done).map((e) => [e.path, e.type])).toEqual([["/a/1", "file"], ["/a/2", "directory"]]);
    fromAgent.write(encodeFrame(Msg.OK, sent[2]!.stream, new FieldWriter().u8(Tag.fsMkdirOk.created, 0).finish()));
    await expect(mk).resolves.toBe(false);
    fromAgent.write(encodeFrame(Msg.OK, sent[3]!.stream));
    await expect(mv).resolves.toBeUndefined();
    fromAgent.write(encodeFrame(Msg.STREAM_ERROR, sent[4]!.stream, new FieldWriter().u32(Tag.streamError.code, 3).bytes(Tag.streamError.message, "cannot remove").u32(Tag.streamError.errno, 39).finish()));
    await expect(rm).rejects.toMatchObject({ agentCode: "IO", errno: 39 });
    expect(fatal).toHaveLength(0);
    expect(client.openStreams).toBe(0);
  });

  it("fails a listing whose OK count differs from the entries sent", async () => {
    const { client, fromAgent, toAgent, fatal } = connected();
    const list = client.list("/a");
    const id = sentFrames(toAgent)[0]!.stream;
    fromAgent.write(encodeFrame(Msg.DATA, id, record(fileFields("/a/1")), 1));
    fromAgent.write(encodeFrame(Msg.OK, id, new FieldWriter().u64(Tag.fsListOk.count, 3).finish()));
    await expect(list.done).rejects.toThrow(/counts 3 entries, 1 arrived/);
    expect(fatal).toHaveLength(0);
  });

  it("delivers watch events after STARTED and returns credit only as they are consumed", async () => {
    const { client, fromAgent, toAgent, fatal } = connected();
    const w = client.watch("/d", true);
    const id = sentFrames(toAgent)[0]!.stream;
    let started = false;
    void w.started.then(() => (started = true));
    fromAgent.write(encodeFrame(Msg.STARTED, id));
    await tick();
    expect(started).toBe(true);
    const got: string[] = [];
    let held = 0;
    w.onEvents = (events, bytes) => {
      got.push(...events.map((e) => `${e.type} ${e.name}`));
      held += bytes;
    };
    const ev = (kind: number, name: string) => record(new FieldWriter().u8(Tag.fsEvent.kind, kind).bytes(Tag.fsEvent.name, name).finish());
    // Fill the window: no WINDOW goes back while the consumer holds the events.
    const big = Buffer.concat(Array.from({ length: 8000 }, (_, i) => ev(1, `f${i}`.padEnd(20, "x"))));
    let off = 0;
    while (off < INITIAL_WINDOW) {
      const n = Math.min(65536, INITIAL_WINDOW - off);
      fromAgent.write(encodeFrame(Msg.DATA, id, big.subarray(off, off + n), 1));
      off += n;
    }
    await tick();
    expect(got.length).toBeGreaterThan(1000);
    expect(sentFrames(toAgent).filter((f) => f.type === Msg.WINDOW)).toEqual([]);
    w.consumed(held);
    expect(sentFrames(toAgent).filter((f) => f.type === Msg.WINDOW).length).toBeGreaterThan(0);
    // Abandoning it sends CANCEL and settles `done`.
    w.abandon(new Error("closed"));
    expect(sentFrames(toAgent).map((f) => f.type)).toEqual([Msg.CANCEL]);
    await expect(w.done).rejects.toThrow("closed");
    expect(fatal).toHaveLength(0);
  });
});
