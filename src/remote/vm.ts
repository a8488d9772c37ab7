/**
 * `RemoteVm`: a sandbox of `supermachine serve` with the interface of a local Vm: exec, spawn
 * (a RemoteExecChild), whole and streamed files, exposeTcp (a RemoteTcpForwarder), snapshot,
 * release and `await using`. Options are checked with the same schemas as locally, so a bad
 * option fails with the same OptionError before anything is sent. The sandbox's life on the
 * server is renewed while the program holds it, so it lives until release, as a local VM does;
 * a client that dies stops renewing and the server releases it when its time runs out.
 */
import { Readable } from "node:stream";
import { ExecError, GuestFileError, PoolError } from "../errors.js";
import {
  callSchema,
  execSchema,
  makeDirSchema,
  readDirSchema,
  readFileSchema,
  readStreamSchema,
  removeSchema,
  spawnSchema,
  statSchema,
  writeFileSchema,
  writeStreamSchema,
  type CallOptions,
  type ExecOptions,
  type ExecOutput,
  type FileInfo,
  type MakeDirOptions,
  type ReadDirOptions,
  type ReadFileOptions,
  type RemoveOptions,
  type SpawnOptions,
  type StatOptions,
  type WriteFileOptions,
} from "../schema/calls.js";
import { hostPortSchema, portSchema } from "../schema/fields.js";
import { parseOptions } from "../schema/parse.js";
import { z } from "zod";
import { RemoteExecChild } from "./child.js";
import { openSocket, request, requestJson, type Endpoint, type RequestBody } from "./http.js";
import { RemoteTcpForwarder } from "./tcp.js";

/** A sandbox as the server describes it. */
export interface SandboxInfo {
  id: string;
  pool: string;
  snapshot: string | null;
  metadata: Record<string, string>;
  startedAt: string;
  endAt: string;
  memoryMib: number;
  vcpus: number;
}

export interface SnapshotInfo {
  id: string;
  pool: string;
  createdAt: string;
  memoryMib: number;
  vcpus: number;
}

type ResolvedExec = z.output<typeof execSchema>;

/** The wire form of exec's and spawn's options (bytes in base64). */
function wireOptions(o: ResolvedExec | z.output<typeof spawnSchema>): Record<string, unknown> {
  return {
    argv: o.argv,
    ...(Object.keys(o.env).length ? { env: o.env } : {}),
    ...(o.cwd !== undefined ? { cwd: o.cwd } : {}),
    ...(o.timeoutMs !== undefined ? { timeoutMs: o.timeoutMs } : {}),
    ...(o.tty ? { tty: true } : {}),
    ...(o.winsize ? { winsize: o.winsize } : {}),
    ...(o.user !== undefined ? { user: o.user } : {}),
    ...(o.limits ? { limits: o.limits } : {}),
    ...(o.detach ? { detach: true } : {}),
    ...(o.files.length ? { stageFiles: o.files.map((f) => ({ path: f.path, data: Buffer.from(f.bytes).toString("base64"), mode: f.mode })) } : {}),
  };
}

export class RemoteVm {
  private released = false;
  private renewTimer: NodeJS.Timeout | undefined;
  private readonly forwarders = new Set<RemoteTcpForwarder>();
  private readonly children = new Set<RemoteExecChild>();

  /** @internal */
  constructor(
    private readonly ep: Endpoint,
    /** The sandbox as the server last described it. */
    public info: SandboxInfo,
    private readonly lifeMs: number,
    private readonly onRelease: (vm: RemoteVm) => Promise<void>,
  ) {
    // Renewed at a third of its life, so one failed renewal still leaves time for the next.
    this.renewTimer = setInterval(() => void this.setTimeout(lifeMs).catch(() => {}), Math.max(1_000, Math.floor(lifeMs / 3)));
    this.renewTimer.unref();
  }

  /** The sandbox's id on the server. */
  get id(): string {
    return this.info.id;
  }

  /** Undefined: the VM's QEMU process runs on the server (the local Vm's `pid` is its pid). */
  get pid(): number | undefined {
    return undefined;
  }

  get isReleased(): boolean {
    return this.released;
  }

  private get base(): string {
    return `/v1/sandboxes/${this.info.id}`;
  }

  private usable(what: string): void {
    if (this.released) throw new PoolError("VM_RELEASED", `${what}: this VM was released back to its pool`, { hint: "acquire a new VM" });
  }

  /** The sandbox lives `ms` from now on the server (renewed automatically while held). */
  async setTimeout(ms: number): Promise<void> {
    this.info = await requestJson<SandboxInfo>(this.ep, `${this.base}/timeout`, "vm.setTimeout", { method: "POST", json: { timeoutMs: ms } });
  }

  /** Runs a process to completion and collects its output. */
  async exec(options: ExecOptions): Promise<ExecOutput> {
    this.usable("vm.exec");
    const o = parseOptions("vm.exec", execSchema, options);
    const out = await requestJson<Omit<ExecOutput, "stdout" | "stderr"> & { stdout: string; stderr: string }>(this.ep, `${this.base}/exec`, `vm.exec ${JSON.stringify(o.argv[0])}`, {
      method: "POST",
      json: { ...wireOptions(o), ...(o.chain ? { chain: o.chain } : {}) },
      signal: o.signal,
    });
    return { ...out, stdout: Buffer.from(out.stdout, "base64"), stderr: Buffer.from(out.stderr, "base64") };
  }

  /** Starts a process and streams its stdin, stdout and stderr over a WebSocket. */
  async spawn(options: SpawnOptions & { killOnDisconnect?: boolean }): Promise<RemoteExecChild> {
    this.usable("vm.spawn");
    const { killOnDisconnect, ...rest } = options;
    const o = parseOptions("vm.spawn", spawnSchema, rest);
    if (o.chain) throw new ExecError("EXEC_STREAM_IN_USE", "vm.spawn: chain is only for vm.exec", { hint: "run the second command yourself once wait() resolves" });
    const what = `vm.spawn ${JSON.stringify(o.argv[0])}`;
    const ws = await openSocket(this.ep, `${this.base}/processes/spawn`, what);
    const child = await RemoteExecChild.start(ws, { type: "start", ...wireOptions(o), ...(killOnDisconnect !== undefined ? { killOnDisconnect } : {}) }, o.argv[0]!).catch((err: unknown) => {
      ws.terminate();
      throw err;
    });
    this.children.add(child);
    void child.wait().catch(() => {}).finally(() => this.children.delete(child));
    // Aborting kills the process, as a local spawn's signal does.
    o.signal?.addEventListener("abort", () => void child.signal("SIGKILL").catch(() => {}), { once: true });
    return child;
  }

  /** Reads a guest file (at most `maxBytes`, default 4 MiB). */
  async readFile(path: string, options: ReadFileOptions = {}): Promise<Buffer> {
    this.usable("vm.readFile");
    const o = parseOptions("vm.readFile", readFileSchema, options);
    const res = await request(this.ep, `${this.base}/files`, `vm.readFile ${path}`, { query: { path, maxBytes: String(o.maxBytes) }, signal: o.signal, path });
    return Buffer.from(await res.arrayBuffer());
  }

  /** A guest file as a Node Readable, streamed from the server. */
  async readFileStream(path: string, options: ReadFileOptions = {}): Promise<Readable> {
    this.usable("vm.readFileStream");
    const o = parseOptions("vm.readFileStream", readStreamSchema, options);
    const res = await request(this.ep, `${this.base}/files`, `vm.readFileStream ${path}`, { query: { path, ...(o.maxBytes !== undefined ? { maxBytes: String(o.maxBytes) } : {}) }, signal: o.signal, path });
    return res.body ? Readable.fromWeb(res.body as import("node:stream/web").ReadableStream<Uint8Array>) : Readable.from([]);
  }

  /** Writes a guest file (at most 4 MiB unless `maxBytes` says). */
  async writeFile(path: string, bytes: Buffer | Uint8Array | string, options: WriteFileOptions = {}): Promise<void> {
    this.usable("vm.writeFile");
    const o = parseOptions("vm.writeFile", writeFileSchema, options);
    const body = typeof bytes === "string" ? Buffer.from(bytes) : bytes;
    if (body.length > o.maxBytes) {
      throw new GuestFileError("FILE_TOO_LARGE", `vm.writeFile: guest path ${path}: ${body.length} bytes is over maxBytes ${o.maxBytes}`, path, undefined, { hint: "raise maxBytes, or use vm.writeFileStream for large files" });
    }
    await request(this.ep, `${this.base}/files`, `vm.writeFile ${path}`, { method: "PUT", body, query: this.writeQuery(path, o), signal: o.signal, path });
  }

  /** Writes a guest file from a Readable or async iterable, streamed to the server; resolves with the bytes written. */
  async writeFileStream(path: string, source: AsyncIterable<Uint8Array | string>, options: WriteFileOptions = {}): Promise<number> {
    this.usable("vm.writeFileStream");
    const o = parseOptions("vm.writeFileStream", writeStreamSchema, options);
    const body = Readable.from(source, { objectMode: false });
    const res = await requestJson<{ bytes: number }>(this.ep, `${this.base}/files`, `vm.writeFileStream ${path}`, {
      method: "PUT",
      body: Readable.toWeb(body) as unknown as RequestBody,
      query: { ...this.writeQuery(path, o), ...(o.maxBytes !== undefined ? { maxBytes: String(o.maxBytes) } : {}) },
      signal: o.signal,
      path,
    });
    return res.bytes;
  }

  /** A guest file's metadata (a symlink as itself). */
  async stat(path: string, options: StatOptions = {}): Promise<FileInfo> {
    this.usable("vm.stat");
    const o = parseOptions("vm.stat", statSchema, options);
    return requestJson<FileInfo>(this.ep, `${this.base}/files/stat`, `vm.stat ${path}`, { query: { path, follow: String(o.follow) }, signal: o.signal, path });
  }

  /** A directory's entries (depth 1 by default), never following symlinks. */
  async readDir(path: string, options: ReadDirOptions = {}): Promise<FileInfo[]> {
    this.usable("vm.readDir");
    const o = parseOptions("vm.readDir", readDirSchema, options);
    return (await requestJson<{ entries: FileInfo[] }>(this.ep, `${this.base}/files/list`, `vm.readDir ${path}`, { query: { path, depth: String(o.depth) }, signal: o.signal, path })).entries;
  }

  /** Makes a directory; resolves true when it created it. */
  async makeDir(path: string, options: MakeDirOptions = {}): Promise<boolean> {
    this.usable("vm.makeDir");
    const { timeoutMs: _t, signal, ...o } = parseOptions("vm.makeDir", makeDirSchema, options);
    return (await requestJson<{ created: boolean }>(this.ep, `${this.base}/files/mkdir`, `vm.makeDir ${path}`, { method: "POST", json: { path, ...o }, signal, path })).created;
  }

  /** Renames or moves a guest file. */
  async rename(from: string, to: string, options: CallOptions = {}): Promise<void> {
    this.usable("vm.rename");
    const o = parseOptions("vm.rename", callSchema, options);
    await request(this.ep, `${this.base}/files/move`, `vm.rename ${from}`, { method: "POST", json: { from, to }, signal: o.signal, path: from });
  }

  /** Removes a guest file, or a directory and what it holds with `recursive`. */
  async remove(path: string, options: RemoveOptions = {}): Promise<void> {
    this.usable("vm.remove");
    const o = parseOptions("vm.remove", removeSchema, options);
    await request(this.ep, `${this.base}/files`, `vm.remove ${path}`, { method: "DELETE", query: { path, recursive: String(o.recursive) }, signal: o.signal, path });
  }

  private writeQuery(path: string, o: { mode: number; user?: string | undefined }): Record<string, string | undefined> {
    return { path, mode: o.mode.toString(8), user: o.user };
  }

  /** Forwards 127.0.0.1:`hostPort` here (0: a free port) to `guestPort` on the guest's loopback. */
  async exposeTcp(hostPort: number, guestPort: number, _options: CallOptions = {}): Promise<RemoteTcpForwarder> {
    this.usable("vm.exposeTcp");
    const ports = parseOptions(`vm.exposeTcp(${String(hostPort)}, ${String(guestPort)})`, z.object({ hostPort: hostPortSchema, guestPort: portSchema }), { hostPort, guestPort });
    const fwd = await RemoteTcpForwarder.listen(this.ep, this.info.id, ports.hostPort, ports.guestPort, (f) => this.forwarders.delete(f));
    this.forwarders.add(fwd);
    return fwd;
  }

  /**
   * Captures the VM on the server. The snapshot lives there (`destDir` is not used: the server
   * picks where); `client.fromSnapshot(snapshot.id)` gives a pool of VMs restored from it.
   */
  async snapshot(_destDir?: string, options: CallOptions = {}): Promise<SnapshotInfo> {
    this.usable("vm.snapshot");
    return requestJson<SnapshotInfo>(this.ep, `${this.base}/snapshot`, "vm.snapshot", { method: "POST", json: options.timeoutMs !== undefined ? { timeoutMs: options.timeoutMs } : {}, signal: options.signal });
  }

  /** Releases the sandbox (its VM goes back to its pool on the server). Idempotent. */
  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    clearInterval(this.renewTimer);
    await Promise.all([...this.forwarders].map((f) => f.destroy()));
    await request(this.ep, this.base, "vm.release", { method: "DELETE" }).catch((err: { code?: string }) => {
      // Already gone (timed out, killed): released all the same.
      if (err.code !== "SERVER_NOT_FOUND") throw err;
    });
    await this.onRelease(this);
  }

  dispose(): Promise<void> {
    return this.release();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.release();
  }

  [Symbol.dispose](): void {
    this.release().catch(() => {});
  }
}
