/**
 * Host connections carried into the guest: each accepted socket becomes a TCP_CONNECT stream
 * on the agent channel to a port on the guest's loopback (PROTOCOL.md). Both directions are
 * flow-controlled end to end: a slow reader on either side slows the writer on the other, and
 * nothing is buffered beyond one window per direction.
 *
 * `TcpForwarder` (vm.exposeTcp) listens on 127.0.0.1; the hybrid-vsock socket (vm.vsockPath)
 * is a unix socket that speaks Firecracker's handshake: the client sends `CONNECT <port>\n`,
 * gets `OK <port>\n` once the guest accepted, and the connection is then the guest's.
 */
import { createServer, type Server, type Socket } from "node:net";
import { Duplex } from "node:stream";
import type { AgentClient, TcpStream } from "../agent/client.js";
import { ForwardError } from "../errors.js";
import { logger } from "../debug.js";

const log = logger("tcp");

export interface SpliceHooks {
  /** Called once the guest accepted (before any guest data is written to the socket). */
  onConnected?: () => void;
  /** Called when the connection is over, whichever way. */
  onClose?: () => void;
}

/** @internal
 * Joins `socket` to a new guest connection to `guestPort`. If the guest refuses, the socket
 * is reset at once (the client sees ECONNRESET rather than a hang).
 */
export function splice(agent: AgentClient, socket: Socket, guestPort: number, hooks: SpliceHooks = {}): void {
  let stream: TcpStream;
  try {
    stream = agent.tcpConnect(guestPort);
  } catch (err) {
    log("connect to guest port %d: %s", guestPort, (err as Error).message);
    socket.resetAndDestroy();
    hooks.onClose?.();
    return;
  }
  let closed = false;
  const finish = () => {
    if (closed) return;
    closed = true;
    hooks.onClose?.();
  };
  socket.setNoDelay(true);

  // guest → host: credit goes back once the socket has taken the bytes.
  stream.onData = (chunk) => {
    if (socket.destroyed) return;
    if (socket.write(chunk)) stream.consumed(chunk.length);
    else socket.once("drain", () => stream.consumed(chunk.length));
  };
  stream.onEnd = () => {
    if (!socket.destroyed) socket.end();
  };

  // host → guest: sent at once while the guest's window has room; otherwise the socket is
  // paused until the window opens, so a slow guest reader slows the host client down.
  let writing: Promise<void> | undefined;
  socket.on("data", (chunk: Buffer) => {
    if (!writing && stream.tryWrite(chunk)) return;
    socket.pause();
    writing = (writing ?? Promise.resolve())
      .then(() => stream.write(chunk))
      .then(
        () => {
          writing = undefined;
          socket.resume();
        },
        () => {
          socket.destroy();
        },
      );
  });
  socket.on("end", () => {
    if (!writing) stream.closeWrite();
    else void writing.then(() => stream.closeWrite()).catch(() => {});
  });
  socket.on("error", (e) => log("host side of guest port %d: %s", guestPort, e.message));
  socket.on("close", () => {
    // The client went away (or we closed it): the guest side is done too.
    if (!stream.ended) stream.abandon(new ForwardError("TCP_CLIENT_CLOSED", "the host client closed the connection"));
    finish();
  });

  stream.onStarted = () => hooks.onConnected?.();
  stream.connected.then(
    () => {},
    (err: Error) => {
      log("guest port %d: %s", guestPort, err.message);
      socket.resetAndDestroy();
    },
  );
  stream.done.then(
    () => {
      if (!socket.destroyed && !socket.writableEnded) socket.end();
    },
    (err: Error) => {
      if (!socket.destroyed) {
        log("guest connection to port %d ended: %s", guestPort, err.message);
        socket.resetAndDestroy();
      }
    },
  );
}

/** Forwards 127.0.0.1:<host port> to a port on the guest's loopback (vm.exposeTcp). */
export class TcpForwarder {
  private stopped = false;
  private readonly live = new Set<Socket>();

  private constructor(
    private readonly server: Server,
    /** The guest port connections go to. */
    readonly guestPort: number,
    private readonly onStop: (f: TcpForwarder) => void,
  ) {}

  /** @internal How the library makes one (users get it from the API, never by `new`). */
  static create(server: Server, guestPort: number, onStop: (f: TcpForwarder) => void): TcpForwarder {
    return new TcpForwarder(server, guestPort, onStop);
  }

  /** `127.0.0.1:<port>`: where clients connect. */
  get localAddr(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** The host port (the one picked when 0 was asked). */
  get port(): number {
    const a = this.server.address();
    return typeof a === "object" && a ? a.port : 0;
  }

  /** Connections open right now. */
  get connections(): number {
    return this.live.size;
  }

  /** @internal */
  track(s: Socket): void {
    this.live.add(s);
    s.once("close", () => this.live.delete(s));
  }

  /** Stops accepting connections; connections already open go on. Idempotent. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.onStop(this);
    // close() stops listening at once; its callback would wait for the open connections,
    // which go on (they end on their own, or with the VM).
    this.server.close();
  }

  /** @internal Stops and cuts every open connection (the VM is going away). */
  async destroy(): Promise<void> {
    for (const s of this.live) s.destroy();
    await this.stop();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }
}

/** @internal Listens on 127.0.0.1:hostPort and carries each connection to `guestPort` in the guest. */
export async function listenTcp(agent: AgentClient, hostPort: number, guestPort: number, onStop: (f: TcpForwarder) => void, signal?: AbortSignal): Promise<TcpForwarder> {
  const server = createServer({ allowHalfOpen: true, pauseOnConnect: false });
  const fwd = TcpForwarder.create(server, guestPort, onStop);
  server.on("connection", (socket) => {
    fwd.track(socket);
    splice(agent, socket, guestPort);
  });
  await new Promise<void>((resolve, reject) => {
    const onAbort = () => {
      server.close();
      reject(signal!.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    server.once("error", (err: NodeJS.ErrnoException) => {
      signal?.removeEventListener("abort", onAbort);
      if (err.code === "EADDRINUSE") {
        reject(
          new ForwardError("TCP_PORT_IN_USE", `vm.exposeTcp(${hostPort}, ${guestPort}): host port ${hostPort} on 127.0.0.1 is already in use`, {
            hint: "pick another host port, or pass 0 to get a free one (forwarder.localAddr tells which)",
            cause: err,
          }),
        );
      } else {
        reject(new ForwardError("TCP_LISTEN_FAILED", `vm.exposeTcp(${hostPort}, ${guestPort}): cannot listen on 127.0.0.1:${hostPort}: ${err.message}`, { cause: err }));
      }
    });
    server.listen({ host: "127.0.0.1", port: hostPort, exclusive: true }, () => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    });
  });
  server.on("error", (err) => log("forwarder %s: %s", fwd.localAddr, err.message));
  // A forwarder nobody uses must not keep the program alive; open connections do.
  server.unref();
  return fwd;
}

const HANDSHAKE_MAX = 64;
const HANDSHAKE_TIMEOUT_MS = 10_000;

/** @internal
 * The hybrid-vsock socket at `path`: `CONNECT <port>\n` → `OK <port>\n`, then the connection is
 * the guest's `127.0.0.1:<port>`. A refused port, a bad line or a silent client is closed.
 */
export function listenVsock(agent: AgentClient, path: string): Server {
  const server = createServer({ allowHalfOpen: true });
  server.on("connection", (socket) => {
    let line = "";
    const timer = setTimeout(() => socket.destroy(), HANDSHAKE_TIMEOUT_MS);
    const onData = (chunk: Buffer) => {
      line += chunk.toString("latin1");
      const nl = line.indexOf("\n");
      if (nl < 0) {
        if (line.length > HANDSHAKE_MAX) socket.destroy();
        return;
      }
      clearTimeout(timer);
      socket.off("data", onData);
      socket.pause();
      const m = /^CONNECT (\d{1,5})\r?$/.exec(line.slice(0, nl));
      const port = m ? Number(m[1]) : 0;
      if (!m || port < 1 || port > 65535) {
        socket.end("ERROR bad request\n");
        return;
      }
      const rest = Buffer.from(line.slice(nl + 1), "latin1");
      if (rest.length) socket.unshift(rest);
      splice(agent, socket, port, { onConnected: () => socket.write(`OK ${port}\n`) });
      socket.resume();
    };
    socket.on("data", onData);
    socket.on("error", () => {});
    socket.on("close", () => clearTimeout(timer));
  });
  server.on("error", (err) => log("vsock socket %s: %s", path, err.message));
  server.listen(path);
  server.unref();
  return server;
}

/** @internal
 * A guest connection's stream as a Node `Duplex` (for code written against streams, such as
 * the egress proxy): what the guest sends is readable, what is written goes to the guest.
 * Flow control stays end to end: credit goes back to the agent only as the reader takes the
 * bytes, and a write completes once it is within the guest's window. Destroying the duplex
 * cancels the stream (the guest socket is reset).
 */
export function streamDuplex(stream: TcpStream): Duplex {
  /** Bytes pushed but not yet credited, because the readable side was full. */
  let owed = 0;
  const duplex = new Duplex({
    allowHalfOpen: true,
    readableHighWaterMark: 64 * 1024,
    read() {
      if (owed > 0) {
        const n = owed;
        owed = 0;
        stream.consumed(n);
      }
    },
    write(chunk: Buffer, _enc, cb) {
      if (stream.tryWrite(chunk)) return cb();
      stream.write(chunk).then(() => cb(), cb);
    },
    final(cb) {
      stream.closeWrite();
      cb();
    },
    destroy(err, cb) {
      if (!stream.ended) stream.abandon(err ?? new ForwardError("TCP_CLOSED", "the host side closed the guest connection"));
      cb(err);
    },
  });
  stream.onData = (chunk) => {
    if (duplex.destroyed) return;
    if (duplex.push(chunk)) stream.consumed(chunk.length);
    else owed += chunk.length;
  };
  stream.onEnd = () => {
    if (!duplex.destroyed) duplex.push(null);
  };
  // A clean end needs nothing here: both sides ended, the duplex destroys itself (autoDestroy).
  stream.done.catch((err: Error) => {
    if (!duplex.destroyed) duplex.destroy(err);
  });
  return duplex;
}
