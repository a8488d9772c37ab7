/**
 * What the agent's calls take and give, as the host sees them: HELLO's answer, exec requests and
 * exits, background entries, file transfers in progress, and the error a stream ends with.
 */
import { AgentError, type AgentStreamErrorName } from "../errors.js";
import type { BackgroundEntry } from "../schema/calls.js";

export type { BackgroundEntry };
import type { TcpStream } from "./streams.js";

export interface HelloInfo {
  version: number;
  agentVersion: string;
  uptimeMs: number;
  features: string[];
  /** Name of the virtio port this connection runs on. */
  port: string | undefined;
  /** The VM id the guest has taken (HELLO `vmId` on the primary port of a VM). */
  vmId: string | undefined;
  /** The default limits of an exec's cgroup, when execs run in cgroups (feature `limits`). */
  limits: { pidsMax: number; memoryMaxBytes: number } | undefined;
}


export interface ExecRequest {
  argv: string[];
  /** Complete environment, `KEY=VALUE` (the caller merges image and call env). */
  env: string[];
  cwd?: string;
  timeoutMs?: number;
  uid?: number;
  gid?: number;
  /** When true the process reads stdin from `ExecStream.write`; otherwise /dev/null. */
  stdin?: boolean;
  /** Run on a pseudo-terminal of this size. */
  tty?: { cols: number; rows: number };
  /** Run after argv exits 0, in the same stream. */
  chain?: string[];
  /** pids.max / memory.max of the exec's cgroup (absent: the agent's defaults). */
  limits?: { pidsMax?: number | undefined; memoryMaxBytes?: number | undefined };
  /** Processes it leaves running survive a kill of the attached leftovers (release). */
  detach?: boolean;
  /**
   * Nobody waits for STARTED (`vm.exec` collects the output and the exit): the agent sends it
   * with the exec's next frame instead of on its own.
   */
  startedWithNext?: boolean;
}

export interface ExitInfo {
  exitCode: number;
  /** Terminating signal number, 0 if none. */
  signal: number;
  timedOut: boolean;
  peakRssKib: number | null;
  durationUs: number;
  /** 0: the first command; 1: the chained one. */
  step: number;
  /** The OOM killer took the exec: its memory limit was reached. */
  oomKilled: boolean;
  /** A fork in the exec failed at its process limit. */
  pidsLimited: boolean;
}

/**
 * An error the agent reported for one stream (STREAM_ERROR): `agentCode` is the protocol's
 * name (`NOT_FOUND`, `REFUSED`, ...), `errno` the guest errno behind it when there was one.
 */
export class AgentStreamError extends AgentError {
  constructor(
    readonly agentCode: AgentStreamErrorName,
    message: string,
    readonly errno: number | undefined,
  ) {
    super(`AGENT_${agentCode}`, message);
  }
}

/** A READ_FILE in progress, for streaming consumers (credit returned as they consume). */
export interface FileReader {
  readonly id: number;
  onData: (chunk: Buffer) => void;
  consumed(n: number): void;
  /** Resolves with the file size once the whole file was sent; rejects on error. */
  readonly done: Promise<number>;
  abandon(err: Error): void;
}

/** A WRITE_FILE in progress, fed by `write` and finished by `finish`. */
export interface FileWriter {
  readonly id: number;
  write(chunk: Buffer): Promise<void>;
  /** Sends EOF and resolves with the size the agent wrote. */
  finish(): Promise<number>;
  abandon(err: Error): void;
}

/**
 * What the agent says of a connection to its proxy listener: the guest client's port and, in
 * transparent mode, the address and port it connected to.
 */
export interface ProxyConnInfo {
  peerPort: number;
  dst?: { address: string; port: number };
  /** The name `dst` stands for, when it is one of the agent's fake DNS addresses (transparent mode). */
  name?: string;
}

/** A transparent-mode DNS question the agent asks the host about (RESOLVE). */
export interface ResolveRequest {
  /** Lowercase, dotted, no trailing dot. */
  name: string;
  /** The DNS type the guest asked for (1 A, 28 AAAA, ...). */
  qtype: number;
}

/** The host's verdict on a name: the agent answers the guest from it, and may keep it `ttl` seconds. */
export interface ResolveAnswer {
  verdict: "allow" | "nxdomain" | "refused" | "servfail";
  ttl: number;
  /** The ports the name is allowed on (informative). */
  ports?: number[];
}

/** Decides the agent's RESOLVE requests while transparent egress is up. */
export type ResolveHandler = (req: ResolveRequest) => Promise<ResolveAnswer>;

/** Takes a connection the guest made to the agent's proxy listener. */
export type ProxyConnHandler = (stream: TcpStream, info: ProxyConnInfo) => void;

