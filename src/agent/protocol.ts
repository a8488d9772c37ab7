/**
 * Host side of the wire protocol specified in native/agent/PROTOCOL.md: frame header, field
 * codec and message constants. Nothing here does I/O; see client.ts for the connection.
 */
import { AgentError, type AgentStreamErrorName } from "../errors.js";

export const PROTOCOL_VERSION = 5;
export const HEADER_SIZE = 12;
export const MAX_PAYLOAD = 1024 * 1024;
export const INITIAL_WINDOW = 256 * 1024;
/** Largest DATA payload the host sends; keeps one stream from hogging the channel. */
export const DATA_CHUNK = 64 * 1024;
export const MAX_PING_PAYLOAD = 4096;

export const Msg = {
  HELLO: 0x01,
  HELLO_OK: 0x02,
  PING: 0x03,
  PONG: 0x04,
  SHUTDOWN: 0x05,
  GOAWAY: 0x06,
  EXEC: 0x10,
  STARTED: 0x11,
  DATA: 0x12,
  WINDOW: 0x13,
  EXIT: 0x14,
  SIGNAL: 0x15,
  STREAM_ERROR: 0x16,
  RESIZE: 0x17,
  CANCEL: 0x18,
  WRITE_FILE: 0x20,
  READ_FILE: 0x21,
  OK: 0x22,
  SPAWN_BENCH: 0x30,
  WORKLOAD_START: 0x40,
  WORKLOAD_SIGNAL: 0x41,
  TCP_CONNECT: 0x50,
  LIST_BACKGROUND: 0x60,
  KILL_BACKGROUND: 0x61,
  PROXY_LISTEN: 0x70,
  PROXY_STOP: 0x71,
  PROXY_CONN: 0x72,
  /** Agent → host, transparent egress: may the guest resolve this name? */
  RESOLVE: 0x73,
  FS_STAT: 0x80,
  FS_LIST: 0x81,
  FS_MKDIR: 0x82,
  FS_RENAME: 0x83,
  FS_REMOVE: 0x84,
  FS_WATCH: 0x85,
} as const;

/** Stream ids from here up are the agent's (PROXY_CONN); the host allocates below. */
export const AGENT_STREAM_BASE = 0x8000_0000;

export const Channel = { STDIN: 0, STDOUT: 1, STDERR: 2 } as const;
export type ChannelId = (typeof Channel)[keyof typeof Channel];
export const FLAG_EOF = 0x80;
export const CHANNEL_MASK = 0x03;

export const StreamErrorCode: Record<number, AgentStreamErrorName> = {
  1: "BAD_REQUEST",
  2: "STREAM_IN_USE",
  3: "IO",
  4: "NOT_FOUND",
  5: "TOO_LARGE",
  6: "UNSUPPORTED",
  7: "VERSION",
  8: "PROTOCOL",
  9: "REFUSED",
};

/** Field tags, per message (PROTOCOL.md section 4). */
export const Tag = {
  hello: { versionMin: 1, versionMax: 2, hostTimeNs: 3, entropy: 4, vmId: 5 },
  helloOk: { version: 1, agentVersion: 2, uptimeMs: 3, features: 4, port: 5, vmId: 6, defaultPidsMax: 7, defaultMemoryMax: 8 },
  goaway: { code: 1, message: 2 },
  exec: { argv: 1, env: 2, cwd: 3, timeoutMs: 4, uid: 5, gid: 6, stdin: 7, tty: 8, cols: 9, rows: 10, chain: 11, pidsMax: 12, memoryMax: 13, detach: 14, startedWithNext: 15 },
  started: { pid: 1, execId: 2 },
  exit: { exitCode: 1, signal: 2, timedOut: 3, peakRssKib: 4, durationUs: 5, step: 6, oomKilled: 7, pidsLimited: 8 },
  signal: { signum: 1, group: 2 },
  streamError: { code: 1, message: 2, errno: 3 },
  resize: { cols: 1, rows: 2 },
  tcpConnect: { port: 1, addr: 2 },
  writeFile: { path: 1, mode: 2, size: 3, uid: 4, gid: 5, mkdirs: 6 },
  readFile: { path: 1, maxSize: 2 },
  ok: { size: 1, samplesNs: 2, pid: 3, killed: 4, entry: 5 },
  /** Fields of one OK `entry` of LIST_BACKGROUND. */
  backgroundEntry: { id: 1, argv: 2, pid: 3, detached: 4 },
  killBackground: { id: 1, all: 2 },
  spawnBench: { argv: 1, count: 2, env: 3 },
  proxyListen: { port: 1, addr: 2, env: 3, maxStreams: 4, mode: 5 },
  proxyConn: { peerPort: 1, dstAddr: 2, dstPort: 3, name: 4 },
  resolve: { name: 1, qtype: 2 },
  /** OK of RESOLVE, sent by the host: verdict 0 allow, 1 nxdomain, 2 refused, 3 servfail. */
  resolveOk: { verdict: 1, ttl: 2, ports: 3 },
  /** OK of PROXY_LISTEN: the port bound (tag 1, a u16: not the `size` of files). */
  proxyListenOk: { port: 1 },
  fsStat: { path: 1, follow: 2 },
  fsList: { path: 1, depth: 2, maxEntries: 3 },
  fsMkdir: { path: 1, mode: 2, parents: 3, uid: 4, gid: 5 },
  fsRename: { from: 1, to: 2 },
  /** FS_REMOVE and FS_WATCH. */
  fsPathRecursive: { path: 1, recursive: 2 },
  /** A file's fields: FS_STAT's OK, each FS_LIST record. */
  fileInfo: { path: 1, name: 2, type: 3, size: 4, mode: 5, uid: 6, gid: 7, mtimeSec: 8, mtimeNsec: 9, target: 10 },
  /** An FS_WATCH record. */
  fsEvent: { kind: 1, name: 2 },
  fsMkdirOk: { created: 1 },
  fsListOk: { count: 1 },
} as const;

/** FS_* limits (PROTOCOL.md): entries of one FS_LIST, bytes of one record. */
export const MAX_LIST_ENTRIES = 100_000;
export const MAX_RECORD = 64 * 1024;

export interface Frame {
  type: number;
  flags: number;
  stream: number;
  payload: Buffer;
}

export function encodeFrame(type: number, stream: number, payload: Buffer = EMPTY, flags = 0): Buffer {
  if (payload.length > MAX_PAYLOAD) {
    throw new AgentError("AGENT_FRAME_TOO_LARGE", `frame payload of ${payload.length} bytes exceeds ${MAX_PAYLOAD}`);
  }
  const out = Buffer.allocUnsafe(HEADER_SIZE + payload.length);
  out.writeUInt32LE(payload.length, 0);
  out.writeUInt8(type, 4);
  out.writeUInt8(flags, 5);
  out.writeUInt16LE(0, 6);
  out.writeUInt32LE(stream >>> 0, 8);
  payload.copy(out, HEADER_SIZE);
  return out;
}

const EMPTY = Buffer.alloc(0);

/** A framing violation (`AGENT_PROTOCOL`); `before` holds the complete frames that preceded it. */
export class FrameError extends AgentError {
  constructor(
    message: string,
    readonly before: Frame[],
  ) {
    super("AGENT_PROTOCOL", message);
  }
}

/**
 * Incremental frame parser for a byte stream. `push` returns the complete frames; a header
 * that announces more than `MAX_PAYLOAD` throws a `FrameError` (carrying the frames of the same
 * chunk that came before it, so what is decoded does not depend on how the stream was split),
 * after which the decoder is unusable (the stream cannot be resynchronised). `pending` tells how many bytes of a partial frame are
 * buffered, so that end-of-stream in the middle of a frame can be reported as truncation.
 *
 * Every byte is copied once, into the header or into the payload buffer of the frame it
 * belongs to (allocated when its header is complete, so never over `MAX_PAYLOAD`): a peer that
 * trickles a large frame a byte at a time costs linear time and one frame of memory, not a
 * copy of everything buffered per byte, nor a Buffer object per byte.
 */
export class FrameDecoder {
  private readonly head = Buffer.alloc(HEADER_SIZE);
  private headFill = 0;
  /** The frame whose header is complete, waiting for the rest of its payload. */
  private frame: Frame | undefined;
  private payloadFill = 0;
  private failed = false;

  constructor(private readonly maxPayload = MAX_PAYLOAD) {}

  get pending(): number {
    return this.headFill + this.payloadFill;
  }

  push(chunk: Buffer): Frame[] {
    if (this.failed) throw new AgentError("AGENT_PROTOCOL", "frame decoder used after a protocol error");
    const frames: Frame[] = [];
    let off = 0;
    for (;;) {
      if (!this.frame) {
        const n = Math.min(HEADER_SIZE - this.headFill, chunk.length - off);
        chunk.copy(this.head, this.headFill, off, off + n);
        this.headFill += n;
        off += n;
        if (this.headFill < HEADER_SIZE) break;
        const len = this.head.readUInt32LE(0);
        if (len > this.maxPayload) {
          this.failed = true;
          throw new FrameError(`agent sent a frame header announcing ${len} bytes (limit ${this.maxPayload})`, frames);
        }
        // The payload gets a buffer of its own: the frame may outlive the read buffer.
        this.frame = { type: this.head.readUInt8(4), flags: this.head.readUInt8(5), stream: this.head.readUInt32LE(8), payload: Buffer.allocUnsafe(len) };
        this.payloadFill = 0;
      }
      const f = this.frame;
      const n = Math.min(f.payload.length - this.payloadFill, chunk.length - off);
      chunk.copy(f.payload, this.payloadFill, off, off + n);
      this.payloadFill += n;
      off += n;
      if (this.payloadFill < f.payload.length) break;
      frames.push(f);
      this.frame = undefined;
      this.headFill = 0;
      this.payloadFill = 0;
    }
    return frames;
  }
}

// ---- fields -------------------------------------------------------------------------------

export type FieldValue = Buffer | string;

/** Builds a fields payload: `tag: u8, len: u32 LE, value`. */
export class FieldWriter {
  private parts: Buffer[] = [];

  bytes(tag: number, value: FieldValue): this {
    const v = typeof value === "string" ? Buffer.from(value, "utf8") : value;
    const head = Buffer.allocUnsafe(5);
    head.writeUInt8(tag, 0);
    head.writeUInt32LE(v.length, 1);
    this.parts.push(head, v);
    return this;
  }
  u8(tag: number, v: number): this {
    const b = Buffer.allocUnsafe(1);
    b.writeUInt8(v, 0);
    return this.bytes(tag, b);
  }
  u16(tag: number, v: number): this {
    const b = Buffer.allocUnsafe(2);
    b.writeUInt16LE(v, 0);
    return this.bytes(tag, b);
  }
  u32(tag: number, v: number): this {
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32LE(v >>> 0, 0);
    return this.bytes(tag, b);
  }
  u64(tag: number, v: bigint | number): this {
    const b = Buffer.allocUnsafe(8);
    b.writeBigUInt64LE(BigInt(v), 0);
    return this.bytes(tag, b);
  }
  finish(): Buffer {
    return Buffer.concat(this.parts);
  }
}

/** Parsed fields, by tag, in arrival order. Truncated fields throw. */
export class Fields {
  private readonly map = new Map<number, Buffer[]>();

  constructor(payload: Buffer, what = "message") {
    let off = 0;
    while (off < payload.length) {
      if (payload.length - off < 5) {
        throw new AgentError("AGENT_PROTOCOL", `${what}: truncated field header at byte ${off}`);
      }
      const tag = payload.readUInt8(off);
      const len = payload.readUInt32LE(off + 1);
      off += 5;
      if (payload.length - off < len) {
        throw new AgentError("AGENT_PROTOCOL", `${what}: field ${tag} announces ${len} bytes, ${payload.length - off} left`);
      }
      const list = this.map.get(tag);
      const value = payload.subarray(off, off + len);
      if (list) list.push(value);
      else this.map.set(tag, [value]);
      off += len;
    }
  }

  all(tag: number): Buffer[] {
    return this.map.get(tag) ?? [];
  }
  bytes(tag: number): Buffer | undefined {
    return this.map.get(tag)?.[0];
  }
  string(tag: number): string | undefined {
    return this.bytes(tag)?.toString("utf8");
  }
  private fixed(tag: number, size: number): Buffer | undefined {
    const b = this.bytes(tag);
    if (b === undefined) return undefined;
    if (b.length !== size) {
      throw new AgentError("AGENT_PROTOCOL", `field ${tag}: expected ${size} bytes, got ${b.length}`);
    }
    return b;
  }
  u8(tag: number): number | undefined {
    return this.fixed(tag, 1)?.readUInt8(0);
  }
  u16(tag: number): number | undefined {
    return this.fixed(tag, 2)?.readUInt16LE(0);
  }
  u32(tag: number): number | undefined {
    return this.fixed(tag, 4)?.readUInt32LE(0);
  }
  i32(tag: number): number | undefined {
    return this.fixed(tag, 4)?.readInt32LE(0);
  }
  i64(tag: number): bigint | undefined {
    return this.fixed(tag, 8)?.readBigInt64LE(0);
  }
  u64(tag: number): bigint | undefined {
    return this.fixed(tag, 8)?.readBigUInt64LE(0);
  }
  u64Array(tag: number): bigint[] {
    const b = this.bytes(tag);
    if (!b) return [];
    if (b.length % 8 !== 0) throw new AgentError("AGENT_PROTOCOL", `field ${tag}: u64 array of ${b.length} bytes`);
    const out: bigint[] = [];
    for (let i = 0; i < b.length; i += 8) out.push(b.readBigUInt64LE(i));
    return out;
  }
}

/**
 * Splits the byte stream of an FS_LIST or FS_WATCH (channel 1) into its records: `len: u32`,
 * then `len` bytes of fields. A record may arrive across DATA frames; one announcing more than
 * MAX_RECORD is a protocol error.
 */
export class RecordDecoder {
  private buf: Buffer = EMPTY;

  constructor(private readonly what: string) {}

  push(chunk: Buffer): Buffer[] {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    const out: Buffer[] = [];
    let off = 0;
    while (this.buf.length - off >= 4) {
      const len = this.buf.readUInt32LE(off);
      if (len > MAX_RECORD) throw new AgentError("AGENT_PROTOCOL", `${this.what}: a record of ${len} bytes (limit ${MAX_RECORD})`);
      if (this.buf.length - off - 4 < len) break;
      out.push(this.buf.subarray(off + 4, off + 4 + len));
      off += 4 + len;
    }
    this.buf = off === this.buf.length ? EMPTY : Buffer.from(this.buf.subarray(off));
    return out;
  }

  /** Bytes of a record not complete yet (at the end of the stream: a truncated record). */
  get pending(): number {
    return this.buf.length;
  }
}

export function windowPayload(increment: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32LE(increment >>> 0, 0);
  return b;
}
