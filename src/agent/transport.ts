/**
 * The byte stream to one guest agent (the QEMU chardev socket): frames decoded as they arrive and
 * handed to `onFrame`, frames encoded and written, and the connection's one-way death. Any
 * violation (an oversized or garbled frame, an error thrown while handling one) fails the whole
 * connection; the VM that owns it is then torn down by its owner.
 *
 * The channel keeps Node's event loop alive only while the layer above says something is in
 * flight (`busy`), so an idle VM never stops a program from exiting (its QEMU process is then
 * killed by the exit hook).
 */
import { EventEmitter } from "node:events";
import type { Duplex } from "node:stream";
import { logger } from "../debug.js";
import { AgentError } from "../errors.js";
import { encodeFrame, type Frame, FrameDecoder, FrameError } from "./protocol.js";

const log = logger("agent");

export interface AgentClientOptions {
  /** Called once when the connection fails for good (protocol violation, channel closed). */
  onFatal?: (err: Error) => void;
}

export abstract class AgentTransport extends EventEmitter {
  private readonly decoder = new FrameDecoder();
  private fatal: Error | undefined;
  private refd = true;

  constructor(
    private readonly channel: Duplex,
    private readonly options: AgentClientOptions = {},
  ) {
    super();
    channel.on("data", (chunk: Buffer) => this.onData(chunk));
    channel.on("error", (err) => this.die(new AgentError("AGENT_CHANNEL", `agent channel error: ${err.message}`, { cause: err })));
    channel.on("close", () => this.die(new AgentError("AGENT_CHANNEL_CLOSED", "the agent channel closed (the VM stopped?)")));
  }

  /** Handles one frame from the agent; a throw fails the connection. */
  protected abstract onFrame(frame: Frame): void;
  /** Fails everything in flight with `err` (the connection is dead). */
  protected abstract failAll(err: Error): void;
  /** Whether an operation is in flight (the channel then keeps the event loop alive). */
  protected abstract busy(): boolean;

  get dead(): Error | undefined {
    return this.fatal;
  }

  private onData(chunk: Buffer): void {
    if (this.fatal) return;
    try {
      let frames: Frame[];
      try {
        frames = this.decoder.push(chunk);
      } catch (err) {
        // The frames before a bad header count, as they would had they come in another read.
        if (err instanceof FrameError) for (const frame of err.before) this.onFrame(frame);
        throw err;
      }
      for (const frame of frames) this.onFrame(frame);
    } catch (err) {
      this.die(err instanceof AgentError ? err : new AgentError("AGENT_PROTOCOL", String(err), { cause: err }));
    }
  }

  private die(err: Error): void {
    if (this.fatal) return;
    this.fatal = err;
    log("connection failed: %s", err.message);
    this.failAll(err);
    this.options.onFatal?.(err);
    this.emit("fatal", err);
  }

  /** Fail the connection from the outside (the VM died, the owner is closing). */
  close(err: Error = new AgentError("AGENT_CLOSED", "the agent connection was closed")): void {
    this.die(err);
    this.channel.destroy();
  }

  /** @internal */
  send(type: number, stream: number, payload?: Buffer, flags = 0): void {
    if (this.fatal) throw this.fatal;
    this.channel.write(encodeFrame(type, stream, payload, flags));
  }

  /** @internal Like send, but silently does nothing on a dead connection. */
  trySend(type: number, stream: number, payload?: Buffer, flags = 0): void {
    if (!this.fatal) this.channel.write(encodeFrame(type, stream, payload, flags));
  }

  protected checkAlive(): void {
    if (this.fatal) throw this.fatal;
  }

  /** Re-evaluates whether the channel keeps the event loop alive (idle: it does not). */
  settle(): void {
    const busy = this.busy();
    if (busy === this.refd) return;
    this.refd = busy;
    const ch = this.channel as Duplex & { ref?: () => void; unref?: () => void };
    if (busy) ch.ref?.();
    else ch.unref?.();
  }
}
