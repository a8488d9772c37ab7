/**
 * `RemoteTcpForwarder`: `vm.exposeTcp` of the remote client. It listens on 127.0.0.1 (as the local
 * one does), and carries each accepted connection over its own WebSocket to the server, which
 * joins it to the guest port. Binary frames are the bytes; a text `{"type":"end"}` is a
 * half-close in either direction. Both directions are flow-controlled: the local socket is paused
 * while the WebSocket's send buffer is high, and the WebSocket is paused while the local socket
 * cannot take more. A guest that refuses the port resets the local connection, as locally.
 */
import { createServer, type Server, type Socket } from "node:net";
import type WebSocket from "ws";
import { ForwardError } from "../errors.js";
import { openSocket, type Endpoint } from "./http.js";

const SEND_HIGH_WATER = 1024 * 1024;

function tunnel(ep: Endpoint, path: string, socket: Socket): void {
  socket.setNoDelay(true);
  socket.pause();
  let ws: WebSocket | undefined;
  let localEnded = false;
  let remoteEnded = false;
  socket.on("error", () => {});
  socket.on("close", () => {
    if (ws && ws.readyState === ws.OPEN && !(localEnded && remoteEnded)) ws.close(1000, "client closed");
  });
  openSocket(ep, path, `exposeTcp ${path}`).then(
    (w) => {
      ws = w;
      if (socket.destroyed) return void w.close(1000);
      w.on("message", (data: Buffer, binary: boolean) => {
        if (!binary) {
          remoteEnded = true;
          if (!socket.destroyed) socket.end();
          return;
        }
        if (!socket.write(data)) {
          w.pause();
          socket.once("drain", () => w.resume());
        }
      });
      w.on("close", (code: number) => {
        // A clean close after both sides ended; anything else (refused, the sandbox ended) resets.
        if (code === 1000 && remoteEnded) socket.end();
        else if (!socket.destroyed) socket.resetAndDestroy();
      });
      socket.on("data", (chunk: Buffer) => {
        w.send(chunk, () => {
          if (socket.isPaused() && w.bufferedAmount < SEND_HIGH_WATER && !socket.destroyed) socket.resume();
        });
        if (w.bufferedAmount >= SEND_HIGH_WATER) socket.pause();
      });
      socket.on("end", () => {
        localEnded = true;
        if (w.readyState === w.OPEN) w.send(JSON.stringify({ type: "end" }));
      });
      socket.resume();
    },
    () => {
      if (!socket.destroyed) socket.resetAndDestroy();
    },
  );
}

export class RemoteTcpForwarder {
  private stopped = false;
  private readonly live = new Set<Socket>();

  private constructor(
    private readonly server: Server,
    /** The guest port connections go to. */
    readonly guestPort: number,
    private readonly onStop: (f: RemoteTcpForwarder) => void,
  ) {}

  /** @internal */
  static async listen(ep: Endpoint, sandboxId: string, hostPort: number, guestPort: number, onStop: (f: RemoteTcpForwarder) => void): Promise<RemoteTcpForwarder> {
    const server = createServer({ allowHalfOpen: true });
    const fwd = new RemoteTcpForwarder(server, guestPort, onStop);
    server.on("connection", (socket) => {
      fwd.live.add(socket);
      socket.once("close", () => fwd.live.delete(socket));
      tunnel(ep, `/v1/sandboxes/${sandboxId}/tcp/${guestPort}`, socket);
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", (err: NodeJS.ErrnoException) => {
        if (err.code === "EADDRINUSE") {
          reject(new ForwardError("TCP_PORT_IN_USE", `vm.exposeTcp(${hostPort}, ${guestPort}): host port ${hostPort} on 127.0.0.1 is already in use`, { hint: "pick another host port, or pass 0 to get a free one (forwarder.localAddr tells which)", cause: err }));
        } else {
          reject(new ForwardError("TCP_LISTEN_FAILED", `vm.exposeTcp(${hostPort}, ${guestPort}): cannot listen on 127.0.0.1:${hostPort}: ${err.message}`, { cause: err }));
        }
      });
      server.listen({ host: "127.0.0.1", port: hostPort, exclusive: true }, resolve);
    });
    server.unref();
    return fwd;
  }

  get localAddr(): string {
    return `127.0.0.1:${this.port}`;
  }

  get port(): number {
    const a = this.server.address();
    return typeof a === "object" && a ? a.port : 0;
  }

  get connections(): number {
    return this.live.size;
  }

  /** Stops accepting connections; connections already open go on. Idempotent. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.onStop(this);
    this.server.close();
  }

  /** @internal Stops and cuts every open connection (the sandbox is going away). */
  async destroy(): Promise<void> {
    for (const s of this.live) s.destroy();
    await this.stop();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }
}
