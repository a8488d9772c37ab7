/**
 * A connection to one guest agent (PROTOCOL.md): the typed calls the host makes — HELLO, PING,
 * EXEC, TCP_CONNECT, file transfers, the file system (FS_*), the workload, background processes,
 * the egress proxy listener — each a thin wrapper that encodes its request and decodes its answer. How requests
 * travel and are answered is ./connection.ts's, the byte stream ./transport.ts's, the streams
 * and their flow control ./streams.ts's and ./windows.ts's.
 *
 * The guest is untrusted: every frame it sends is validated, and any violation fails the whole
 * connection. Flow control is end to end: an operation returns window credit only as its
 * consumer takes the bytes, so a guest writing faster than the host reads is paused in the
 * guest, and host memory per channel stays within one window (256 KiB).
 */
import { AgentError } from "../errors.js";
import { AgentConnection } from "./connection.js";
import type { BackgroundEntry, ExecRequest, FileReader, FileWriter, HelloInfo, ProxyConnHandler, ResolveHandler } from "./messages.js";
import { dirEventOf, fileInfoOf, type DirEvent, type FileInfo } from "./fs.js";
import { Channel, Fields, FieldWriter, FLAG_EOF, MAX_LIST_ENTRIES, MAX_PING_PAYLOAD, Msg, PROTOCOL_VERSION, RecordDecoder, Tag } from "./protocol.js";
import { ExecStream, RequestOp, TcpStream } from "./streams.js";
import { sendWindowed } from "./windows.js";

export { AgentStreamError, type BackgroundEntry, type ExecRequest, type ExitInfo, type FileReader, type FileWriter, type HelloInfo, type ProxyConnHandler, type ProxyConnInfo, type ResolveAnswer, type ResolveHandler, type ResolveRequest } from "./messages.js";
export { ExecStream, TcpStream, type RequestOp } from "./streams.js";
export type { DirEvent, FileInfo } from "./fs.js";

/** An FS_LIST in progress. */
export interface DirLister {
  readonly done: Promise<FileInfo[]>;
  abandon(err: Error): void;
}

/**
 * An FS_WATCH in progress: events arrive through `onEvents` with the bytes they took, which the
 * consumer hands back with `consumed` as it takes them (the guest holds the rest). `done`
 * settles when the guest ends the watch (OK: the directory was removed) or it fails.
 */
export interface DirWatcher {
  /** Resolves once the guest watches (STARTED); rejects with its error. */
  readonly started: Promise<void>;
  onEvents: (events: DirEvent[], bytes: number) => void;
  consumed(n: number): void;
  readonly done: Promise<void>;
  abandon(err: Error): void;
}
export type { AgentClientOptions } from "./transport.js";

/**
 * The host end of one agent connection. Create it on a connected duplex (the QEMU chardev
 * socket), then call `hello()` before anything else.
 */
export class AgentClient extends AgentConnection {
  /**
   * HELLO: `entropy` is mixed into the guest RNG, which is then reseeded; a `vmId` the VM does
   * not have yet gives it a new identity (PROTOCOL.md: `/run/supermachine/vm-id`, a new boot_id).
   */
  hello(opts: { entropy?: Buffer; vmId?: string; timeoutMs?: number } = {}): Promise<HelloInfo> {
    this.checkAlive();
    const w = new FieldWriter()
      .u16(Tag.hello.versionMin, PROTOCOL_VERSION)
      .u16(Tag.hello.versionMax, PROTOCOL_VERSION)
      .u64(Tag.hello.hostTimeNs, BigInt(Date.now()) * 1_000_000n);
    if (opts.entropy) w.bytes(Tag.hello.entropy, opts.entropy);
    if (opts.vmId !== undefined) w.bytes(Tag.hello.vmId, opts.vmId);
    // A HELLO ends the agent's proxy listener (PROTOCOL.md, PROXY_LISTEN).
    this.proxyHandler = undefined;
    this.resolveHandler = undefined;
    return new Promise<HelloInfo>((resolve, reject) => {
      const timer =
        opts.timeoutMs === undefined
          ? undefined
          : setTimeout(() => {
              this.helloWaiter = undefined;
              this.settle();
              reject(new AgentError("AGENT_HELLO_TIMEOUT", `the agent did not answer HELLO within ${opts.timeoutMs} ms`));
            }, opts.timeoutMs);
      this.helloWaiter = {
        resolve: (h) => {
          clearTimeout(timer);
          resolve(h);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      this.settle();
      this.send(Msg.HELLO, 0, w.finish());
    });
  }

  /** One protocol round trip that starts no process. Resolves with the elapsed milliseconds. */
  ping(payload: Buffer = Buffer.alloc(0), opts: { timeoutMs?: number } = {}): Promise<number> {
    this.checkAlive();
    if (payload.length > MAX_PING_PAYLOAD) throw new AgentError("AGENT_PING_TOO_LARGE", `ping payload over ${MAX_PING_PAYLOAD} bytes`);
    const id = this.allocId();
    const t0 = performance.now();
    return new Promise<number>((resolve, reject) => {
      const timer =
        opts.timeoutMs === undefined
          ? undefined
          : setTimeout(() => done(new AgentError("AGENT_PING_TIMEOUT", `the agent did not answer a ping within ${opts.timeoutMs} ms`)), opts.timeoutMs);
      const done = (err?: Error, echo?: Buffer) => {
        clearTimeout(timer);
        this.off("fatal", onFatal);
        this.pings.delete(id);
        this.settle();
        if (err) reject(err);
        else if (!echo!.equals(payload)) reject(new AgentError("AGENT_PROTOCOL", "PONG payload differs from PING"));
        else resolve(performance.now() - t0);
      };
      const onFatal = (e: Error) => done(e);
      this.once("fatal", onFatal);
      this.pings.set(id, (echo) => done(undefined, echo));
      this.settle();
      this.send(Msg.PING, id, payload);
    });
  }

  exec(req: ExecRequest, opts: { autoGrant?: boolean } = {}): ExecStream {
    const w = new FieldWriter();
    for (const a of req.argv) w.bytes(Tag.exec.argv, a);
    for (const e of req.env) w.bytes(Tag.exec.env, e);
    if (req.cwd !== undefined) w.bytes(Tag.exec.cwd, req.cwd);
    if (req.timeoutMs) w.u64(Tag.exec.timeoutMs, Math.ceil(req.timeoutMs));
    if (req.uid !== undefined) w.u32(Tag.exec.uid, req.uid);
    if (req.gid !== undefined) w.u32(Tag.exec.gid, req.gid);
    if (req.stdin) w.u8(Tag.exec.stdin, 1);
    if (req.tty) w.u8(Tag.exec.tty, 1).u16(Tag.exec.cols, req.tty.cols).u16(Tag.exec.rows, req.tty.rows);
    for (const a of req.chain ?? []) w.bytes(Tag.exec.chain, a);
    if (req.limits?.pidsMax) w.u32(Tag.exec.pidsMax, req.limits.pidsMax);
    if (req.limits?.memoryMaxBytes) w.u64(Tag.exec.memoryMax, req.limits.memoryMaxBytes);
    if (req.detach) w.u8(Tag.exec.detach, 1);
    if (req.startedWithNext) w.u8(Tag.exec.startedWithNext, 1);
    return this.open((id) => new ExecStream(this, id, opts.autoGrant ?? true), Msg.EXEC, w.finish());
  }

  /** Opens a TCP connection from the guest to its own `addr:port` (default 127.0.0.1). */
  tcpConnect(port: number, addr?: string): TcpStream {
    const w = new FieldWriter().u16(Tag.tcpConnect.port, port);
    if (addr !== undefined) w.bytes(Tag.tcpConnect.addr, addr);
    return this.open((id) => new TcpStream(this, id), Msg.TCP_CONNECT, w.finish());
  }

  /** Starts a WRITE_FILE; feed it with `write` and end it with `finish`. */
  openWrite(path: string, opts: { mode?: number; uid?: number; gid?: number; size?: number } = {}): FileWriter {
    const w = new FieldWriter().bytes(Tag.writeFile.path, path).u32(Tag.writeFile.mode, opts.mode ?? 0o644);
    if (opts.size !== undefined) w.u64(Tag.writeFile.size, opts.size);
    if (opts.uid !== undefined) w.u32(Tag.writeFile.uid, opts.uid);
    if (opts.gid !== undefined) w.u32(Tag.writeFile.gid, opts.gid);
    const op = this.open((id) => new RequestOp(this, id, `write ${path}`), Msg.WRITE_FILE, w.finish());
    let finished = false;
    return {
      id: op.id,
      write: (chunk) => {
        if (finished) return Promise.reject(new AgentError("AGENT_STREAM_ENDED", `write ${path}: write after finish`));
        return sendWindowed(this, op.id, op.sendWindow, chunk, op.gone);
      },
      finish: async () => {
        if (!finished && !op.ended) this.send(Msg.DATA, op.id, undefined, Channel.STDIN | FLAG_EOF);
        finished = true;
        return Number((await op.result).u64(Tag.ok.size) ?? 0n);
      },
      abandon: (err) => op.abandon(err),
    };
  }

  async writeFile(path: string, data: Buffer, opts: { mode?: number; uid?: number; gid?: number } = {}): Promise<void> {
    const w = this.openWrite(path, { ...opts, size: data.length });
    await w.write(data);
    await w.finish();
  }

  /**
   * Starts a READ_FILE. With `autoGrant` (default) credit is returned as chunks arrive; a
   * streaming consumer passes false and calls `consumed`.
   */
  openRead(path: string, maxSize = 0, autoGrant = true): FileReader {
    const w = new FieldWriter().bytes(Tag.readFile.path, path).u64(Tag.readFile.maxSize, maxSize);
    const op = this.open((id) => new RequestOp(this, id, `read ${path}`, maxSize || Infinity, autoGrant), Msg.READ_FILE, w.finish());
    const reader: FileReader = {
      id: op.id,
      get onData() {
        return op.onData;
      },
      set onData(fn) {
        op.onData = fn;
      },
      consumed: (n) => op.consumed(n),
      done: op.result.then((f) => Number(f.u64(Tag.ok.size) ?? 0n)),
      abandon: (err) => op.abandon(err),
    };
    reader.done.catch(() => {});
    return reader;
  }

  async readFile(path: string, maxSize = 0): Promise<Buffer> {
    const r = this.openRead(path, maxSize);
    const chunks: Buffer[] = [];
    r.onData = (c) => chunks.push(c);
    await r.done;
    return Buffer.concat(chunks);
  }

  /** FS_STAT: a file's metadata; with `follow`, a symlink's target's. */
  async stat(path: string, follow = false): Promise<FileInfo> {
    const w = new FieldWriter().bytes(Tag.fsStat.path, path).u8(Tag.fsStat.follow, follow ? 1 : 0);
    return fileInfoOf(await this.request(Msg.FS_STAT, `stat ${path}`, w.finish()), "FS_STAT");
  }

  /** FS_LIST: the entries of a directory, `depth` levels down, as the guest streams them. */
  list(path: string, depth = 1, maxEntries = MAX_LIST_ENTRIES): DirLister {
    const w = new FieldWriter().bytes(Tag.fsList.path, path).u32(Tag.fsList.depth, depth).u32(Tag.fsList.maxEntries, maxEntries);
    const op = this.open((id) => new RequestOp(this, id, `list ${path}`), Msg.FS_LIST, w.finish());
    const records = new RecordDecoder(`list ${path}`);
    const entries: FileInfo[] = [];
    op.onData = (chunk) => {
      for (const r of records.push(chunk)) {
        if (entries.length >= maxEntries) throw new AgentError("AGENT_PROTOCOL", `list ${path}: more than the ${maxEntries} entries asked for`);
        entries.push(fileInfoOf(new Fields(r, "FS_LIST entry"), "FS_LIST entry"));
      }
    };
    const done = op.result.then((ok) => {
      const count = Number(ok.u64(Tag.fsListOk.count) ?? -1n);
      if (records.pending || count !== entries.length) {
        throw new AgentError("AGENT_PROTOCOL", `list ${path}: OK counts ${count} entries, ${entries.length} arrived (${records.pending} bytes left over)`);
      }
      return entries;
    });
    done.catch(() => {});
    return { done, abandon: (err) => op.abandon(err) };
  }

  /** FS_MKDIR: resolves with whether it created the directory. */
  async mkdir(path: string, opts: { mode: number; parents: boolean; uid?: number | undefined; gid?: number | undefined }): Promise<boolean> {
    const w = new FieldWriter().bytes(Tag.fsMkdir.path, path).u32(Tag.fsMkdir.mode, opts.mode).u8(Tag.fsMkdir.parents, opts.parents ? 1 : 0);
    if (opts.uid !== undefined) w.u32(Tag.fsMkdir.uid, opts.uid);
    if (opts.gid !== undefined) w.u32(Tag.fsMkdir.gid, opts.gid);
    return (await this.request(Msg.FS_MKDIR, `make directory ${path}`, w.finish())).u8(Tag.fsMkdirOk.created) === 1;
  }

  /** FS_RENAME: rename(2) in the guest. */
  async rename(from: string, to: string): Promise<void> {
    await this.request(Msg.FS_RENAME, `rename ${from}`, new FieldWriter().bytes(Tag.fsRename.from, from).bytes(Tag.fsRename.to, to).finish());
  }

  /** FS_REMOVE: a file, a symlink, an empty directory, or with `recursive` a whole tree. */
  async remove(path: string, recursive = false): Promise<void> {
    const w = new FieldWriter().bytes(Tag.fsPathRecursive.path, path).u8(Tag.fsPathRecursive.recursive, recursive ? 1 : 0);
    await this.request(Msg.FS_REMOVE, `remove ${path}`, w.finish());
  }

  /** FS_WATCH: events of a directory (and below it, `recursive`) until abandoned or ended. */
  watch(path: string, recursive = false): DirWatcher {
    const w = new FieldWriter().bytes(Tag.fsPathRecursive.path, path).u8(Tag.fsPathRecursive.recursive, recursive ? 1 : 0);
    const op = this.open((id) => new RequestOp(this, id, `watch ${path}`, Infinity, false), Msg.FS_WATCH, w.finish());
    const records = new RecordDecoder(`watch ${path}`);
    const watcher: DirWatcher = {
      started: op.started,
      onEvents: () => {},
      consumed: (n) => op.consumed(n),
      done: op.result.then(() => {}),
      abandon: (err) => op.abandon(err),
    };
    // Credit goes back per chunk, once the consumer has taken every event of it.
    op.onData = (chunk) => {
      const events = records.push(chunk).map(dirEventOf);
      watcher.onEvents(events, chunk.length);
    };
    watcher.done.catch(() => {});
    return watcher;
  }

  /** Ask the agent to time `count` spawn+reap cycles of `argv` itself (guest clock). */
  async spawnBench(argv: string[], count: number, env: string[] = []): Promise<number[]> {
    const w = new FieldWriter();
    for (const a of argv) w.bytes(Tag.spawnBench.argv, a);
    w.u32(Tag.spawnBench.count, count);
    for (const e of env) w.bytes(Tag.spawnBench.env, e);
    const f = await this.request(Msg.SPAWN_BENCH, `spawn bench ${argv.join(" ")}`, w.finish());
    return f.u64Array(Tag.ok.samplesNs).map((ns) => Number(ns) / 1e6);
  }

  /** Starts the image's workload (PROTOCOL.md: WORKLOAD_START). Resolves with its guest pid. */
  async startWorkload(req: Omit<ExecRequest, "stdin" | "timeoutMs" | "tty" | "chain">): Promise<number> {
    const w = new FieldWriter();
    for (const a of req.argv) w.bytes(Tag.exec.argv, a);
    for (const e of req.env) w.bytes(Tag.exec.env, e);
    if (req.cwd !== undefined) w.bytes(Tag.exec.cwd, req.cwd);
    if (req.uid !== undefined) w.u32(Tag.exec.uid, req.uid);
    if (req.gid !== undefined) w.u32(Tag.exec.gid, req.gid);
    return (await this.request(Msg.WORKLOAD_START, `start workload ${req.argv[0] ?? ""}`, w.finish())).u32(Tag.ok.pid) ?? -1;
  }

  /** Sends `signum` to the workload's process group. */
  async signalWorkload(signum: number): Promise<void> {
    await this.request(Msg.WORKLOAD_SIGNAL, `signal ${signum} to the workload`, new FieldWriter().u32(Tag.signal.signum, signum).finish());
  }

  /** Processes execs left running after their main process ended (LIST_BACKGROUND). */
  async listBackground(): Promise<BackgroundEntry[]> {
    const f = await this.request(Msg.LIST_BACKGROUND, "list background processes");
    return f.all(Tag.ok.entry).map((raw) => {
      const e = new Fields(raw, "background entry");
      return {
        id: e.u32(Tag.backgroundEntry.id) ?? 0,
        argv: e.all(Tag.backgroundEntry.argv).map((a) => a.toString("utf8")),
        pids: e.all(Tag.backgroundEntry.pid).map((p) => {
          if (p.length !== 4) throw new AgentError("AGENT_PROTOCOL", `background entry: pid of ${p.length} bytes`);
          return p.readUInt32LE(0);
        }),
        detached: (e.u8(Tag.backgroundEntry.detached) ?? 0) === 1,
      };
    });
  }

  /**
   * Kills processes execs left running (KILL_BACKGROUND): one exec's (`id`), or every exec's
   * not started with `detach` (with `all`, those too). Resolves with how many execs' were killed.
   */
  async killBackground(target: { id?: number; all?: boolean } = {}): Promise<number> {
    const w = new FieldWriter();
    if (target.id !== undefined) w.u32(Tag.killBackground.id, target.id);
    if (target.all) w.u8(Tag.killBackground.all, 1);
    return (await this.request(Msg.KILL_BACKGROUND, "kill background processes", w.finish())).u32(Tag.ok.killed) ?? 0;
  }

  /**
   * PROXY_LISTEN: the agent listens on the guest's `addr:port` (default 127.0.0.1), adds `env`
   * to every exec and workload while it does, and hands each connection accepted there to
   * `onConnection` as a stream (PROXY_CONN) until `proxyStop`, the next `hello` or the end of the
   * connection. Resolves with the port bound. With `mode: "transparent"` the agent also steers
   * every TCP connection the guest opens to a non-loopback IPv4 address to that listener (port
   * 0 lets the kernel pick one), and each connection's `info.dst` is where the client meant to go.
   * In transparent mode the agent also answers the guest's DNS queries, asking `onResolve` about
   * each name (without it every name is SERVFAIL); a connection to a fake address it handed out
   * has `info.name`.
   */
  async proxyListen(
    opts: { port: number; addr?: string; env?: string[]; maxStreams?: number; mode?: "proxy" | "transparent"; onResolve?: ResolveHandler },
    onConnection: ProxyConnHandler,
  ): Promise<number> {
    this.checkAlive();
    const w = new FieldWriter().u16(Tag.proxyListen.port, opts.port);
    if (opts.addr !== undefined) w.bytes(Tag.proxyListen.addr, opts.addr);
    for (const e of opts.env ?? []) w.bytes(Tag.proxyListen.env, e);
    if (opts.maxStreams !== undefined) w.u32(Tag.proxyListen.maxStreams, opts.maxStreams);
    // The field is sent only for transparent mode, so an older agent sees today's request.
    if (opts.mode === "transparent") w.u8(Tag.proxyListen.mode, 1);
    // Connections may arrive before the OK: the handler is in place first.
    this.proxyHandler = onConnection;
    this.resolveHandler = opts.mode === "transparent" ? opts.onResolve : undefined;
    const what = opts.mode === "transparent" ? "transparent egress listen" : `proxy listen on port ${opts.port}`;
    try {
      return (await this.request(Msg.PROXY_LISTEN, what, w.finish())).u16(Tag.proxyListenOk.port) ?? opts.port;
    } catch (err) {
      if (this.proxyHandler === onConnection) {
        this.proxyHandler = undefined;
        this.resolveHandler = undefined;
      }
      throw err;
    }
  }

  /** PROXY_STOP: the listener closes and its connections end (reset). */
  async proxyStop(): Promise<void> {
    try {
      await this.request(Msg.PROXY_STOP, "proxy stop");
    } finally {
      this.proxyHandler = undefined;
      this.resolveHandler = undefined;
    }
  }

  /** Ask the guest to power off. The caller waits for the hypervisor to exit. */
  shutdown(): void {
    if (!this.dead) this.send(Msg.SHUTDOWN, 0);
  }
}
