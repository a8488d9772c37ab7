/**
 * The native API's WebSocket routes. A process socket starts a process (its first text frame is
 * the start message) or attaches to a running one by pid; then binary frames carry bytes, with a
 * first byte naming the stream (0 stdin, 1 stdout, 2 stderr), and text frames carry control as
 * JSON (signal, resize, closeStdin from the client, each answered by an ack; started, exit and
 * error from the server). A TCP socket is one connection to a guest port: binary frames are the
 * bytes, a text `{"type":"end"}` is a half-close.
 *
 * Flow control runs end to end: output is taken from the process only while the socket's send
 * buffer is below SEND_HIGH_WATER (the process table's follower queue then fills and its pump
 * stops reading the guest), and a client's bytes are read from the socket only while the guest
 * takes them (the socket is paused while stdin's Writable, or the guest connection, is full).
 *
 * Processes live in the sandbox's process table, beside the E2B profile's: a socket that closes
 * leaves its process running (attach again by pid) unless the start message said
 * `killOnDisconnect: true`.
 */
import type { FastifyRequest } from "fastify";
import type { WebSocket } from "ws";
import type { Duplex } from "node:stream";
import { SupermachineError } from "../../errors.js";
import { streamDuplex } from "../../session/tcp.js";
import type { ExecChild } from "../../session/exec-child.js";
import { ServerError } from "../errors.js";
import type { ServerMetrics } from "../metrics.js";
import { ManagedProcess } from "../processes.js";
import { countProcess, type Sandbox } from "../sandboxes.js";
import { CHANNEL, clientControl, startMessage } from "./schemas.js";

/** Bytes queued on a socket beyond which the server stops taking output from the guest. */
export const SEND_HIGH_WATER = 1024 * 1024;
/** Pings keep proxies from closing quiet sockets, and find dead peers. */
const PING_MS = 30_000;

/** Close codes beyond the standard ones (4000-4999 are the application's). */
export const CLOSE = { badRequest: 4400, notFound: 4404, refused: 4502, error: 4500 } as const;

function wireError(err: unknown): { code: string; message: string; hint?: string } {
  if (err instanceof SupermachineError) return { code: err.code, message: err.message, ...(err.hint ? { hint: err.hint } : {}) };
  return { code: "SERVER_PROTOCOL", message: err instanceof Error ? err.message : String(err) };
}

function closeCodeOf(err: unknown): number {
  if (!(err instanceof SupermachineError)) return CLOSE.error;
  if (err.code === "SERVER_NOT_FOUND" || err.code === "VM_RELEASED") return CLOSE.notFound;
  if (err.code === "SERVER_BAD_REQUEST" || err.code.startsWith("OPTION_") || err.code === "EXEC_USER_UNKNOWN") return CLOSE.badRequest;
  return CLOSE.error;
}

/** Sends an error frame, then closes (close reasons are limited to 123 bytes, so the frame carries the detail). */
function fail(socket: WebSocket, err: unknown): void {
  if (socket.readyState !== socket.OPEN) return;
  socket.send(JSON.stringify({ type: "error", error: wireError(err) }));
  socket.close(closeCodeOf(err), (err instanceof SupermachineError ? err.code : "error").slice(0, 100));
}

function keepAlive(socket: WebSocket): void {
  const timer = setInterval(() => socket.ping(), PING_MS);
  timer.unref();
  socket.once("close", () => clearInterval(timer));
}

/** Sends `data`; resolves at once while the socket's buffer is low, else once this frame is out. */
function sendPaced(socket: WebSocket, data: Buffer | string): Promise<void> {
  return new Promise((resolve) => {
    if (socket.readyState !== socket.OPEN) return resolve();
    socket.send(data, () => resolve());
    if (socket.bufferedAmount < SEND_HIGH_WATER) resolve();
  });
}

const frame = (channel: number, data: Buffer): Buffer => Buffer.concat([Buffer.of(channel), data]);

/** The stdin Writable of a child, with one error listener however many sockets write to it. */
const guarded = new WeakSet<ExecChild>();
function stdinOf(child: ExecChild) {
  const stdin = child.stdin;
  if (!guarded.has(child)) {
    guarded.add(child);
    // Writing to a process that has exited fails like a closed pipe; the exit frame tells why.
    stdin.on("error", () => {});
  }
  return stdin;
}

export interface ProcessSocketDeps {
  sandbox: () => Sandbox;
  metrics: ServerMetrics;
  /** Attach to this pid instead of starting a process. */
  attach?: () => number;
}

export function processSocket(socket: WebSocket, req: FastifyRequest, deps: ProcessSocketDeps): void {
  keepAlive(socket);
  let sb: Sandbox;
  try {
    sb = deps.sandbox();
  } catch (err) {
    fail(socket, err);
    return;
  }
  const left = new AbortController();
  let proc: ManagedProcess | undefined;
  let killOnDisconnect = false;
  // Frames that came before the process was there (stdin sent right after the start message).
  const early: Array<{ data: Buffer; binary: boolean }> = [];

  socket.on("close", () => {
    left.abort();
    if (killOnDisconnect && proc?.running) void proc.child.signal("SIGKILL").catch(() => {});
  });

  const onFrame = (data: Buffer, binary: boolean) => {
    if (!proc) {
      early.push({ data, binary });
      return;
    }
    const child = proc.child;
    if (binary) {
      if (data.length === 0 || data[0] !== CHANNEL.stdin) return fail(socket, new ServerError("SERVER_BAD_REQUEST", "a binary frame from the client must start with channel 0 (stdin)", { hint: "see docs/serve.md, Native API" }));
      const stdin = stdinOf(child);
      if (stdin.writableEnded) return;
      if (!stdin.write(data.subarray(1))) {
        socket.pause();
        stdin.once("drain", () => socket.resume());
      }
      return;
    }
    let msg: ReturnType<typeof clientControl.parse> & { id?: number };
    let id: number | undefined;
    try {
      const raw = JSON.parse(data.toString("utf8")) as Record<string, unknown>;
      id = typeof raw?.id === "number" ? raw.id : undefined;
      if (raw && typeof raw === "object") delete raw.id;
      const r = clientControl.safeParse(raw);
      if (!r.success) throw new ServerError("SERVER_BAD_REQUEST", `control frame: ${r.error.issues[0]!.path.join(".") || "type"}: ${r.error.issues[0]!.message}`, { hint: "send signal, resize or closeStdin" });
      msg = r.data;
    } catch (err) {
      return fail(socket, err instanceof ServerError ? err : new ServerError("SERVER_BAD_REQUEST", `control frame is not JSON: ${(err as Error).message}`, { hint: "text frames are JSON objects" }));
    }
    const ack = (err?: unknown) => {
      if (id !== undefined && socket.readyState === socket.OPEN) socket.send(JSON.stringify({ type: "ack", id, ...(err ? { error: wireError(err) } : {}) }));
    };
    const act = async () => {
      if (msg.type === "signal") await child.signal(msg.signal);
      else if (msg.type === "resize") await child.resize(msg.cols, msg.rows);
      else {
        const stdin = stdinOf(child);
        if (!stdin.writableEnded) await new Promise<void>((r) => stdin.end(r));
      }
    };
    act().then(() => ack(), ack);
  };
  socket.on("message", (data: Buffer, binary: boolean) => onFrame(data, binary));

  const run = async () => {
    if (deps.attach) {
      proc = sb.processes.find({ pid: deps.attach() }, `attach to a process of sandbox ${sb.id}`);
    } else {
      const first = await new Promise<{ data: Buffer; binary: boolean } | undefined>((resolve) => {
        if (early.length) return resolve(early.shift());
        const onMsg = () => {
          socket.off("close", onClose);
          resolve(early.shift());
        };
        const onClose = () => {
          socket.off("message", onMsg);
          resolve(undefined);
        };
        socket.once("message", onMsg);
        socket.once("close", onClose);
      });
      if (!first) return;
      if (first.binary) throw new ServerError("SERVER_BAD_REQUEST", "the first frame must be the start message (JSON text)", { hint: 'send {"type":"start","argv":[...]}' });
      let raw: unknown;
      try {
        raw = JSON.parse(first.data.toString("utf8"));
      } catch (err) {
        throw new ServerError("SERVER_BAD_REQUEST", `the start message is not JSON: ${(err as Error).message}`, { hint: 'send {"type":"start","argv":[...]}' });
      }
      const r = startMessage.safeParse(raw);
      if (!r.success) {
        const issue = r.error.issues[0]!;
        throw new ServerError("SERVER_BAD_REQUEST", `start message: ${issue.path.map(String).join(".") || "body"}: ${issue.message}`, { hint: "GET /openapi.json describes the start message (StartMessage)" });
      }
      const m = r.data;
      killOnDisconnect = m.killOnDisconnect === true;
      const child = await sb.vm.spawn({
        argv: m.argv,
        env: { ...sb.env, ...m.env },
        ...(m.cwd !== undefined ? { cwd: m.cwd } : {}),
        ...(m.timeoutMs !== undefined ? { timeoutMs: m.timeoutMs } : {}),
        ...(m.tty !== undefined ? { tty: m.tty } : {}),
        ...(m.winsize ? { winsize: m.winsize } : {}),
        ...(m.user !== undefined ? { user: m.user } : {}),
        ...(m.limits ? { limits: m.limits } : {}),
        ...(m.detach !== undefined ? { detach: m.detach } : {}),
        ...(m.stageFiles ? { stageFilesMode: m.stageFiles.map((f) => ({ path: f.path, bytes: Buffer.from(f.data, "base64"), mode: f.mode ?? 0o644 })) } : {}),
      });
      countProcess(sb, deps.metrics, "spawn");
      const p = new ManagedProcess(child.pid ?? 0, child, { cmd: m.argv[0]!, args: m.argv.slice(1), envs: m.env ?? {}, cwd: m.cwd }, undefined, child.tty);
      // A process that never started (no such command) has no pid to be found by.
      if (child.pid !== undefined) sb.processes.add(p);
      proc = p;
      if (socket.readyState !== socket.OPEN && killOnDisconnect) void child.signal("SIGKILL").catch(() => {});
    }
    // Registered before anything is sent, so no output produced meanwhile is lost.
    const events = proc.follow(left.signal);
    socket.send(JSON.stringify({ type: "started", pid: proc.pid, tty: proc.pty }));
    for (const f of early.splice(0)) onFrame(f.data, f.binary);
    for await (const e of events) {
      if (!e) continue;
      if (e.type === "data") await sendPaced(socket, frame(e.stream === "stderr" ? CHANNEL.stderr : CHANNEL.stdout, e.data));
      else break;
    }
    if (left.signal.aborted) return;
    let result;
    try {
      result = await proc.child.wait();
    } catch (err) {
      return fail(socket, err);
    }
    socket.send(JSON.stringify({ type: "exit", result }));
    socket.close(1000, "exited");
  };
  run().catch((err: unknown) => {
    req.log.info({ err: wireError(err) }, "process socket failed");
    fail(socket, err);
  });
}

export interface TcpSocketDeps {
  sandbox: () => Sandbox;
  port: () => number;
}

/**
 * One TCP connection to the guest's 127.0.0.1:port, carried over the agent's channel (as
 * vm.exposeTcp carries one), closed when the sandbox ends.
 */
export function tcpSocket(socket: WebSocket, req: FastifyRequest, deps: TcpSocketDeps): void {
  keepAlive(socket);
  let sb: Sandbox;
  let port: number;
  let guest: Duplex;
  try {
    sb = deps.sandbox();
    port = deps.port();
    if (sb.vm.isReleased || !sb.vm.machine.alive) throw new ServerError("SERVER_SANDBOX_GONE", `sandbox ${sb.id}'s VM is gone`, { hint: "create another sandbox" });
    guest = streamDuplex(sb.vm.machine.agent.tcpConnect(port));
  } catch (err) {
    fail(socket, err);
    return;
  }
  const cleanup = () => {
    guest.destroy();
    if (socket.readyState === socket.OPEN) socket.close(CLOSE.error, "sandbox ended");
  };
  sb.cleanups.add(cleanup);
  let guestEnded = false;
  let clientEnded = false;
  const maybeDone = () => {
    if (guestEnded && clientEnded && socket.readyState === socket.OPEN) socket.close(1000, "done");
  };

  // guest → client, paced by the socket's buffer.
  guest.on("data", (chunk: Buffer) => {
    if (socket.readyState !== socket.OPEN) return;
    socket.send(chunk, () => {
      if (guest.isPaused() && socket.bufferedAmount < SEND_HIGH_WATER) guest.resume();
    });
    if (socket.bufferedAmount >= SEND_HIGH_WATER) guest.pause();
  });
  guest.on("end", () => {
    guestEnded = true;
    if (socket.readyState === socket.OPEN) socket.send(JSON.stringify({ type: "end" }));
    maybeDone();
  });
  guest.on("error", (err: Error) => {
    req.log.info({ port, err: err.message }, "guest connection failed");
    if (socket.readyState === socket.OPEN) socket.close(CLOSE.refused, `guest port ${port}: ${err.message}`.slice(0, 120));
  });
  guest.on("close", () => sb.cleanups.delete(cleanup));

  // client → guest, read from the socket only while the guest takes it.
  socket.on("message", (data: Buffer, binary: boolean) => {
    if (!binary) {
      let type: unknown;
      try {
        type = (JSON.parse(data.toString("utf8")) as { type?: unknown }).type;
      } catch {
        type = undefined;
      }
      if (type !== "end") return fail(socket, new ServerError("SERVER_BAD_REQUEST", 'the only text frame of a TCP socket is {"type":"end"}', { hint: "send the connection's bytes as binary frames" }));
      clientEnded = true;
      guest.end();
      maybeDone();
      return;
    }
    if (!guest.write(data)) {
      socket.pause();
      guest.once("drain", () => socket.resume());
    }
  });
  socket.on("close", () => {
    if (!guest.destroyed && !(guestEnded && clientEnded)) guest.destroy();
  });
}
