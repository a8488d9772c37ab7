/**
 * `GuestSession`: what can be done to a running guest through its agent: run processes
 * (collected or streamed), move files, carry TCP connections in, signal the workload; the file
 * system calls (stat, readDir, makeDir, rename, remove, watchDir) it inherits from ./fs.ts. `Vm`
 * (runtime) extends it with pool semantics; a bake's warmup gets one directly.
 *
 * Every call validates its options before anything reaches the guest, takes an AbortSignal, and
 * has a host-side deadline, so a guest that stops answering never hangs the caller.
 */
import { join } from "node:path";
import type { Server } from "node:net";
import { Readable } from "node:stream";
import { AgentStreamError, type ExecRequest } from "../agent/client.js";
import { CallScope, callScope } from "../deadline.js";
import type { MicroVm } from "../engine/qemu.js";
import { AgentError, DeadlineError, ExecError, OptionError, PoolError } from "../errors.js";
import { logger } from "../debug.js";
import { guestPath, hostPortSchema, portSchema, signalSchema, bytesLike, mergeLimits, type ExecLimits } from "../schema/fields.js";
import { CALL_DEFAULT_TIMEOUT_MS, callSchema, execSchema, readFileSchema, readStreamSchema, spawnSchema, writeFileSchema, writeStreamSchema, type CallOptions, type ExecOptions, type ExecOutput, type ReadFileOptions, type SpawnOptions, type WriteFileOptions, type BackgroundEntry } from "../schema/calls.js";
import { parseOptions } from "../schema/parse.js";
import { mergeEnv, resolveImageUser, type ExecDefaults } from "./env.js";
import { ExecChild, signalName } from "./exec-child.js";
import { OutputQueue } from "../output-queue.js";
import { listenTcp, listenVsock, type TcpForwarder } from "./tcp.js";
import { GuestEgress, noNetStats, type NetStats } from "./egress.js";
import { GuestFs, type Abandonable } from "./fs.js";
import type { ResolvedNetwork } from "../schema/network.js";
import { z } from "zod";

const log = logger("guest");

/** Output a collect-mode exec keeps per stream before it kills the process. */
const MAX_COLLECT = 64 * 1024 * 1024;
/**
 * How long past its own guest-side timeout the host waits for a process's end before giving
 * up on the guest: the agent kills at `timeoutMs`, so only a guest that stopped answering
 * takes longer.
 */
export const HOST_GRACE_MS = 5_000;

export class GuestSession extends GuestFs {
  /** Users named by a call's `user` (or the defaults'), resolved once each. */
  private readonly users = new Map<string, Promise<{ uid: number; gid: number }>>();
  private readonly resolvedUsers = new Map<string, { uid: number; gid: number }>();
  /** Operations in flight, with how many scopes hold each. */
  private readonly inflight = new Map<Abandonable, number>();
  private readonly forwarders = new Set<TcpForwarder>();
  private vsock: Server | undefined;
  private egress: GuestEgress | undefined;

  /** @internal */
  constructor(
    /** @internal */ readonly machine: MicroVm,
    /** @internal */ protected readonly defaults: ExecDefaults,
  ) {
    super();
  }

  /** Host pid of the QEMU process. */
  get pid(): number {
    return this.machine.pid;
  }

  /**
   * This VM's id (a UUID): a new one for every VM, restores of one snapshot included. The guest
   * reads it at /run/supermachine/vm-id.
   */
  get id(): string {
    return this.machine.id;
  }

  /** "kvm" or "tcg". */
  get accel(): string {
    return this.machine.accel;
  }

  /**
   * A unix socket for clients that bring their own code: Firecracker's hybrid-vsock handshake
   * (`CONNECT <port>\n` → `OK <port>\n`), after which the connection is the guest's
   * `127.0.0.1:<port>`. There is no virtio-vsock here: connections are carried over the agent's
   * virtio-serial channel.
   */
  get vsockPath(): string {
    const path = join(this.machine.runDir, "vsock.sock");
    if (!this.vsock && this.machine.alive) this.vsock = listenVsock(this.machine.agent, path);
    return path;
  }

  /**
   * A unix socket that speaks the agent protocol (native/agent/PROTOCOL.md) on the VM's second
   * virtio-serial port (`supermachine.1`), served by QEMU: one client at a time.
   */
  get execPath(): string {
    return this.machine.execPath;
  }

  /** @internal Throws if the session cannot take calls (Vm adds "released"). */
  protected usable(what: string): void {
    if (!this.machine.alive) {
      throw new PoolError("VM_DEAD", `${what}: the VM (QEMU pid ${this.machine.pid}) is no longer running${this.consoleLogNote()}`, {
        hint: "release it and acquire another; the pool replaces dead VMs",
      });
    }
  }

  private resolveUser(spec = this.defaults.user): Promise<{ uid: number; gid: number } | undefined> {
    if (!spec) return Promise.resolve(undefined);
    let ids = this.users.get(spec);
    if (!ids) this.users.set(spec, (ids = resolveImageUser(this.machine.agent, spec).then((r) => (this.resolvedUsers.set(spec, r), r))));
    ids.catch(() => this.users.delete(spec));
    return ids;
  }

  /** @internal Runs `op` under `scope`: an abort or the deadline abandons it (CANCEL) and rejects. */
  protected track(op: Abandonable, scope: CallScope | AbortSignal | undefined): () => void {
    this.inflight.set(op, (this.inflight.get(op) ?? 0) + 1);
    let detach: () => void = () => {};
    if (scope instanceof CallScope) {
      detach = scope.onAbort((reason) => op.abandon(reason as Error));
    } else if (scope) {
      const onAbort = () => op.abandon(scope.reason as Error);
      if (scope.aborted) onAbort();
      else {
        scope.addEventListener("abort", onAbort, { once: true });
        detach = () => scope.removeEventListener("abort", onAbort);
      }
    }
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const n = (this.inflight.get(op) ?? 1) - 1;
      if (n > 0) this.inflight.set(op, n);
      else this.inflight.delete(op);
      detach();
    };
  }

  /** Where the dead VM's guest console log was kept, for its error message. */
  private consoleLogNote(): string {
    const kept = this.machine.failureLog;
    return kept ? ` (guest console log: ${kept})` : "";
  }

  /** A failure as the caller should see it: the VM's death rather than the channel's. */
  protected explain(e: unknown, what: string): Error {
    if (!this.machine.alive && !(e instanceof DeadlineError)) {
      return new PoolError("VM_DEAD", `${what}: the VM (QEMU pid ${this.machine.pid}) died${this.consoleLogNote()}`, {
        cause: e,
        hint: "release it and acquire another; the pool replaces dead VMs",
      });
    }
    return e instanceof Error ? e : new AgentError("AGENT_UNKNOWN", String(e));
  }

  /** The EXEC request; a promise only when the image's user must first be looked up. */
  private execRequest(
    o: { argv: string[]; env: Record<string, string>; cwd?: string | undefined; tty: boolean; winsize?: { cols: number; rows: number } | undefined; chain?: string[] | undefined; timeoutMs?: number | undefined; limits?: ExecLimits | undefined; detach: boolean; user?: string | undefined },
    stdin: boolean,
  ): ExecRequest | Promise<ExecRequest> {
    const limits = mergeLimits(this.defaults.limits, o.limits);
    const make = (ids: { uid: number; gid: number } | undefined): ExecRequest => ({
      argv: o.argv,
      env: mergeEnv(this.defaults.env, o.env),
      cwd: o.cwd ?? this.defaults.workingDir ?? "/",
      ...(o.timeoutMs !== undefined ? { timeoutMs: o.timeoutMs } : {}),
      ...ids,
      stdin,
      ...(o.tty ? { tty: o.winsize ?? { cols: 80, rows: 24 } } : {}),
      ...(o.chain ? { chain: o.chain } : {}),
      ...(limits ? { limits: { pidsMax: limits.processes, memoryMaxBytes: limits.memoryMib === undefined ? undefined : limits.memoryMib * 1024 * 1024 } } : {}),
      ...(o.detach ? { detach: true } : {}),
    });
    const spec = o.user ?? this.defaults.user;
    const known = spec === undefined ? undefined : this.resolvedUsers.get(spec);
    return spec && !known ? this.resolveUser(spec).then(make) : make(known);
  }

  /** Stages files and builds the request; synchronous (no await before the send) when neither needs the guest. */
  private prepare(o: Parameters<GuestSession["execRequest"]>[0] & { files: { path: string; bytes: Buffer; mode: number }[] }, stdin: boolean, scope: CallScope): ExecRequest | Promise<ExecRequest> {
    const req = this.execRequest(o, stdin);
    if (o.files.length === 0 && !(req instanceof Promise)) return req;
    return scope.race(this.stage(o.files, scope).then(() => req));
  }

  private async stage(files: { path: string; bytes: Buffer; mode: number }[], scope: CallScope): Promise<void> {
    await Promise.all(
      files.map(async (f) => {
        const w = this.machine.agent.openWrite(f.path, { mode: f.mode, size: f.bytes.length });
        const untrack = this.track(w, scope);
        try {
          await w.write(f.bytes);
          await w.finish();
        } catch (e) {
          throw this.fileError("vm.exec: stageFiles", f.path, e);
        } finally {
          untrack();
        }
      }),
    );
  }

  /**
   * Runs a process to completion and collects its output.
   *
   * @example
   * const { stdout, exitCode } = await vm.exec({ argv: ["python3", "-c", "print(6*7)"], timeoutMs: 10_000 });
   */
  async exec(options: ExecOptions): Promise<ExecOutput> {
    this.usable("vm.exec");
    const o = parseOptions("vm.exec", execSchema, options);
    const what = `vm.exec ${JSON.stringify(o.argv[0])}`;
    const scope = callScope(what, o.timeoutMs + HOST_GRACE_MS, o.signal);
    try {
      const req = this.prepare(o, false, scope);
      const stream = this.machine.agent.exec({ ...(req instanceof Promise ? await req : req), startedWithNext: true });
      const untrack = this.track(stream, scope);
      const out: Buffer[] = [];
      const err: Buffer[] = [];
      let outLen = 0;
      let errLen = 0;
      let overflow = false;
      const collect = (into: Buffer[], len: number, c: Buffer) => {
        if (len > MAX_COLLECT) {
          if (!overflow) stream.cancel();
          overflow = true;
        } else into.push(c);
      };
      stream.onStdout = (c) => collect(out, (outLen += c.length), c);
      stream.onStderr = (c) => collect(err, (errLen += c.length), c);
      let exit;
      try {
        exit = await stream.wait();
      } finally {
        untrack();
      }
      if (overflow) {
        throw new ExecError("EXEC_OUTPUT_LIMIT", `${what} wrote more than ${MAX_COLLECT} bytes on one stream; it was killed`, {
          hint: "redirect large output to a file and read it with vm.readFileStream, or stream it with vm.spawn",
        });
      }
      return {
        stdout: Buffer.concat(out),
        stderr: Buffer.concat(err),
        exitCode: exit.exitCode,
        timedOut: exit.timedOut,
        signal: signalName(exit.signal),
        durationMs: exit.durationUs / 1000,
        oomKilled: exit.oomKilled,
        pidsLimited: exit.pidsLimited,
      };
    } catch (e) {
      throw this.explain(e, what);
    } finally {
      scope.done();
    }
  }

  /**
   * Starts a process and streams its stdin, stdout and stderr. Resolves once it runs (or has
   * ended without starting: a missing command gives exit code 127, as exec does).
   *
   * @example
   * const child = await vm.spawn({ argv: ["sh", "-c", "for i in 1 2 3; do echo $i; sleep 1; done"] });
   * child.stdout.pipe(process.stdout);
   * const { exitCode } = await child.wait();
   */
  async spawn(options: SpawnOptions): Promise<ExecChild> {
    this.usable("vm.spawn");
    const o = parseOptions("vm.spawn", spawnSchema, options);
    const what = `vm.spawn ${JSON.stringify(o.argv[0])}`;
    const start = callScope(what, CALL_DEFAULT_TIMEOUT_MS, o.signal);
    let child: ExecChild;
    try {
      const req = this.prepare(o, true, start);
      const stream = this.machine.agent.exec(req instanceof Promise ? await req : req, { autoGrant: false });
      child = ExecChild.create(stream, o.argv[0]!, o.tty, (e) => this.explain(e, what));
      const untrackStart = this.track(stream, start);
      try {
        await stream.started;
      } finally {
        untrackStart();
      }
      // From here on the process is the caller's: their signal, and a host deadline past the
      // guest-side timeout when there is one.
      const life = callScope(what, o.timeoutMs === undefined ? undefined : o.timeoutMs + HOST_GRACE_MS, o.signal);
      const untrack = this.track(stream, life);
      void child.wait().then(
        () => {},
        () => {},
      ).finally(() => {
        untrack();
        life.done();
      });
    } catch (e) {
      throw this.explain(e, what);
    } finally {
      start.done();
    }
    return child;
  }

  // ---- files -------------------------------------------------------------------------------

  private checkPath(what: string, path: unknown): string {
    return parseOptions(what, z.object({ path: guestPath }), { path }).path;
  }

  /** Reads a guest file (at most `maxBytes`, default 4 MiB). A missing file rejects with code ENOENT. */
  async readFile(path: string, options: ReadFileOptions = {}): Promise<Buffer> {
    this.usable("vm.readFile");
    const p = this.checkPath("vm.readFile", path);
    const o = parseOptions("vm.readFile", readFileSchema, options);
    const scope = callScope(`vm.readFile ${p}`, o.timeoutMs, o.signal);
    const r = this.machine.agent.openRead(p, o.maxBytes);
    const untrack = this.track(r, scope);
    const chunks: Buffer[] = [];
    r.onData = (c) => chunks.push(c);
    try {
      await r.done;
      return Buffer.concat(chunks);
    } catch (e) {
      throw this.fileError("vm.readFile", p, e);
    } finally {
      untrack();
      scope.done();
    }
  }

  /** Writes a guest file (created or truncated, parents created; at most `maxBytes`, default 4 MiB). */
  async writeFile(path: string, bytes: Buffer | Uint8Array | string, options: WriteFileOptions = {}): Promise<void> {
    this.usable("vm.writeFile");
    const p = this.checkPath("vm.writeFile", path);
    const o = parseOptions("vm.writeFile", writeFileSchema, options);
    const data = parseOptions("vm.writeFile", z.object({ bytes: bytesLike }), { bytes }).bytes;
    if (data.length > o.maxBytes) {
      throw new OptionError("OPTION_FILE_TOO_LARGE", `vm.writeFile: ${data.length} bytes for ${p} is over the ${o.maxBytes}-byte limit`, {
        hint: "raise maxBytes, or use vm.writeFileStream for large files",
      });
    }
    const scope = callScope(`vm.writeFile ${p}`, o.timeoutMs, o.signal);
    const owner = o.user ? await scope.race(this.resolveUser(o.user)) : undefined;
    const w = this.machine.agent.openWrite(p, { mode: o.mode, size: data.length, ...owner });
    const untrack = this.track(w, scope);
    try {
      await w.write(data);
      await w.finish();
    } catch (e) {
      throw this.fileError("vm.writeFile", p, e);
    } finally {
      untrack();
      scope.done();
    }
  }

  /**
   * A guest file as a Node Readable, streamed with flow control (no size limit unless
   * `maxBytes`). Resolves once the guest has opened the file; `timeoutMs` bounds that wait.
   */
  async readFileStream(path: string, options: ReadFileOptions = {}): Promise<Readable> {
    this.usable("vm.readFileStream");
    const p = this.checkPath("vm.readFileStream", path);
    const o = parseOptions("vm.readFileStream", readStreamSchema, options);
    const scope = callScope(`vm.readFileStream ${p}`, o.timeoutMs, o.signal);
    const r = this.machine.agent.openRead(p, o.maxBytes ?? 0, false);
    const q = new OutputQueue((n) => r.consumed(n), `vm.readFileStream ${p}`);
    let opened!: () => void;
    const isOpen = new Promise<void>((res) => (opened = res));
    r.onData = (c) => {
      opened();
      q.push(c);
    };
    const untrackOpen = this.track(r, scope);
    const untrackLife = this.track(r, o.signal);
    const done = r.done.then(
      () => q.end(),
      (e: unknown) => {
        const err = this.fileError("vm.readFileStream", p, e);
        q.fail(err);
        throw err;
      },
    );
    void done.catch(() => {}).finally(untrackLife);
    try {
      await Promise.race([isOpen, done]);
      return q.stream();
    } finally {
      untrackOpen();
      scope.done();
    }
  }

  /**
   * Writes a guest file from a Node Readable (or any async iterable of bytes), with flow
   * control; resolves with the number of bytes written. `timeoutMs` bounds each step (the
   * guest taking a chunk), not the whole transfer.
   */
  async writeFileStream(path: string, source: AsyncIterable<Uint8Array | string>, options: WriteFileOptions = {}): Promise<number> {
    this.usable("vm.writeFileStream");
    const p = this.checkPath("vm.writeFileStream", path);
    const o = parseOptions("vm.writeFileStream", writeStreamSchema, options);
    if (source === null || typeof (source as AsyncIterable<unknown>)?.[Symbol.asyncIterator] !== "function") {
      throw new OptionError("OPTION_INVALID", `vm.writeFileStream: source must be a Readable or an async iterable of Buffers, got ${typeof source}`);
    }
    const owner = o.user ? await this.resolveUser(o.user) : undefined;
    const w = this.machine.agent.openWrite(p, { mode: o.mode, ...owner });
    const untrackLife = this.track(w, o.signal);
    let total = 0;
    const step = async <T>(label: string, fn: () => Promise<T>): Promise<T> => {
      const s = callScope(`vm.writeFileStream ${p}: ${label}`, o.timeoutMs);
      const untrack = this.track(w, s);
      try {
        return await s.race(fn());
      } finally {
        untrack();
        s.done();
      }
    };
    try {
      for await (const chunk of source) {
        const buf = typeof chunk === "string" ? Buffer.from(chunk) : Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
        total += buf.length;
        if (o.maxBytes !== undefined && total > o.maxBytes) {
          const err = new OptionError("OPTION_FILE_TOO_LARGE", `vm.writeFileStream: ${p}: the source holds more than maxBytes (${o.maxBytes})`);
          w.abandon(err);
          throw err;
        }
        await step("sending", () => w.write(buf));
      }
      return await step("finishing", () => w.finish());
    } catch (e) {
      w.abandon(e as Error);
      throw this.fileError("vm.writeFileStream", p, e);
    } finally {
      untrackLife();
    }
  }

  // ---- processes left running -----------------------------------------------------------------

  /**
   * Processes execs (and spawns) left running after their main process ended, per exec: its
   * id, argv, the guest pids still there, and whether it was started with `detach`. They run
   * on within the exec's limits until they end, `vm.killBackground` kills them, or the VM is
   * released (a pool with `restoreOnRelease: false` kills those not detached).
   *
   * @example
   * await vm.exec({ argv: ["sh", "-c", "sleep 600 &"] });
   * const [{ id, pids }] = await vm.listBackground();
   */
  async listBackground(options: CallOptions = {}): Promise<BackgroundEntry[]> {
    this.usable("vm.listBackground");
    const o = parseOptions("vm.listBackground", callSchema, options);
    const scope = callScope("vm.listBackground", o.timeoutMs, o.signal);
    try {
      return await scope.race(this.machine.agent.listBackground());
    } catch (e) {
      throw this.explain(e, "vm.listBackground");
    } finally {
      scope.done();
    }
  }

  /**
   * Kills processes execs left running: those of exec `id` (as `listBackground` and
   * `child.execId` name it), or else of every exec not started with `detach` (with
   * `detached: true`, of those too). Resolves with the number of execs whose processes were
   * killed.
   */
  async killBackground(options: CallOptions & { id?: number; detached?: boolean } = {}): Promise<number> {
    this.usable("vm.killBackground");
    const o = parseOptions("vm.killBackground", callSchema.extend({ id: z.number().int().min(1).max(0xffffffff).optional(), detached: z.boolean().default(false) }), options);
    const scope = callScope("vm.killBackground", o.timeoutMs, o.signal);
    try {
      return await scope.race(this.machine.agent.killBackground({ ...(o.id !== undefined ? { id: o.id } : {}), all: o.detached }));
    } catch (e) {
      throw this.explain(e, "vm.killBackground");
    } finally {
      scope.done();
    }
  }

  // ---- TCP and workload ----------------------------------------------------------------------

  /**
   * Forwards 127.0.0.1:`hostPort` (0: a free port) to `guestPort` on the guest's loopback.
   *
   * @example
   * const fwd = await vm.exposeTcp(0, 8080);
   * const res = await fetch(`http://${fwd.localAddr}/`);
   * await fwd.stop();
   */
  async exposeTcp(hostPort: number, guestPort: number, options: CallOptions = {}): Promise<TcpForwarder> {
    this.usable("vm.exposeTcp");
    const what = `vm.exposeTcp(${String(hostPort)}, ${String(guestPort)})`;
    const ports = parseOptions(what, z.object({ hostPort: hostPortSchema, guestPort: portSchema }), { hostPort, guestPort });
    const o = parseOptions(what, callSchema, options);
    const scope = callScope(what, o.timeoutMs, o.signal);
    try {
      const fwd = await scope.race(listenTcp(this.machine.agent, ports.hostPort, ports.guestPort, (f) => this.forwarders.delete(f), scope.signal));
      this.forwarders.add(fwd);
      return fwd;
    } finally {
      scope.done();
    }
  }

  /** Sends a signal (e.g. 15 or "SIGTERM") to the image's workload, the VM's main process. */
  async workloadSignal(signum: number | string, options: CallOptions = {}): Promise<void> {
    this.usable("vm.workloadSignal");
    const what = `vm.workloadSignal(${String(signum)})`;
    const n = parseOptions(what, z.object({ signum: signalSchema }), { signum }).signum;
    const o = parseOptions(what, callSchema, options);
    const scope = callScope(what, o.timeoutMs, o.signal);
    try {
      await scope.race(this.machine.agent.signalWorkload(n));
    } catch (e) {
      if (e instanceof AgentStreamError && e.agentCode === "NOT_FOUND") {
        throw new ExecError("EXEC_NO_WORKLOAD", `${what}: ${e.message}`, {
          cause: e,
          hint: "the image has no workload running (no ENTRYPOINT/CMD, or it exited)",
        });
      }
      throw this.explain(e, what);
    } finally {
      scope.done();
    }
  }

  /**
   * @internal Turns egress on for this session (`network: { allow }` of its pool or build):
   * the guest's proxy port and variables, the host proxy behind them and, in transparent mode,
   * every TCP connection and DNS query of the guest. "none" does nothing.
   */
  async startEgress(network: ResolvedNetwork | "none"): Promise<void> {
    if (network === "none" || this.egress) return;
    this.egress = await GuestEgress.start(this.machine.agent, network);
  }

  /** Whether egress is on for this session (its pool's `network`, or a server's sandbox network). */
  get hasEgress(): boolean {
    return this.egress !== undefined;
  }

  /**
   * Connections and bytes through this VM's egress since it was acquired (all zero with
   * `network: "none"`): `connections` made, `active` now, `refused` (by the allowlist or a limit;
   * `refusedBy` counts them per reason), `failed` (bad requests, unreachable targets);
   * `bytesOut` sent by the guest, `bytesIn` received by it; `dnsQueries` the guest made and
   * `dnsRefused` (answered without an address) in transparent mode.
   *
   * @example
   * const { connections, refused, refusedBy, bytesIn } = vm.netStats();
   */
  netStats(): NetStats {
    return this.egress?.stats() ?? noNetStats();
  }

  /**
   * @internal Ends everything this session started: processes still running are killed
   * (CANCEL), forwarders and the vsock socket closed, open forwarded connections cut.
   */
  async closeSession(reason: Error): Promise<void> {
    for (const op of [...this.inflight.keys()]) op.abandon(reason);
    this.inflight.clear();
    const egress = this.egress;
    this.egress = undefined;
    await egress?.stop(!this.machine.alive);
    const fwds = [...this.forwarders];
    this.forwarders.clear();
    this.vsock?.close();
    this.vsock = undefined;
    await Promise.all(fwds.map((f) => f.destroy().catch((e: Error) => log("closing forwarder: %s", e.message))));
  }
}
