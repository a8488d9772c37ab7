/**
 * The page's side of the HTTP API of `supermachine serve`: JSON requests carrying the API key in
 * `X-API-KEY`, the key's place in sessionStorage, and the event stream (Server-Sent Events read
 * from a `fetch` body, because EventSource cannot send the key header).
 */
import { createParser } from "eventsource-parser";

const KEY_STORAGE = "supermachine.apiKey";

export const loadKey = (): string | null => sessionStorage.getItem(KEY_STORAGE);
export const saveKey = (key: string): void => sessionStorage.setItem(KEY_STORAGE, key);
export const clearKey = (): void => sessionStorage.removeItem(KEY_STORAGE);

/** A request the server refused or that never reached it. */
export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly errorCode: string | null = null,
    readonly hint: string | null = null,
  ) {
    super(message);
  }
}

async function errorOf(res: Response): Promise<ApiError> {
  let body: { message?: unknown; errorCode?: unknown; code?: unknown; hint?: unknown } = {};
  try {
    body = (await res.json()) as typeof body;
  } catch {
    // Not JSON: the status line says it.
  }
  const str = (v: unknown): string | null => (typeof v === "string" && v !== "" ? v : null);
  const message = str(body.message) ?? `${res.status} ${res.statusText || "error"}`;
  return new ApiError(message, res.status, str(body.errorCode) ?? str(body.code), str(body.hint));
}

/** The client of one key. `onUnauthorized` runs when the server answers 401 to it. */
export class Api {
  constructor(
    readonly key: string,
    private readonly onUnauthorized: (err: ApiError) => void = () => {},
  ) {}

  private async request(path: string, init: Omit<RequestInit, "headers"> & { headers?: Record<string, string> } = {}): Promise<Response> {
    let res: Response;
    try {
      res = await fetch(path, { ...init, headers: { "X-API-KEY": this.key, ...init.headers } });
    } catch (err) {
      throw new ApiError(`Cannot reach the server: ${(err as Error).message}`, 0, null, "Is supermachine serve still running?");
    }
    if (res.ok) return res;
    const err = await errorOf(res);
    if (res.status === 401) this.onUnauthorized(err);
    throw err;
  }

  async json<T>(path: string): Promise<T> {
    return (await (await this.request(path, { headers: { Accept: "application/json" } })).json()) as T;
  }

  async text(path: string): Promise<string> {
    return (await this.request(path)).text();
  }

  async delete(path: string): Promise<void> {
    await this.request(path, { method: "DELETE" });
  }

  /**
   * Follows `/v1/events` until `signal` aborts: reconnects with a backoff of 1 s doubling to 10 s,
   * sending `Last-Event-ID` so the server replays only what was missed.
   */
  async followEvents(signal: AbortSignal, onEvent: (event: ServerEvent) => void, onStatus: (status: StreamStatus) => void): Promise<void> {
    let lastId: string | null = null;
    let delay = 1000;
    while (!signal.aborted) {
      try {
        const headers: Record<string, string> = { Accept: "text/event-stream" };
        if (lastId !== null) headers["Last-Event-ID"] = lastId;
        const res = await this.request("/v1/events", { headers, signal });
        if (!res.body) throw new Error("no body");
        onStatus("live");
        delay = 1000;
        const parser = createParser({
          onEvent: (msg) => {
            if (msg.id !== undefined) lastId = msg.id;
            try {
              onEvent(JSON.parse(msg.data) as ServerEvent);
            } catch {
              // A message that is not JSON is not one of ours.
            }
          },
        });
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          parser.feed(value);
        }
      } catch (err) {
        if (signal.aborted || (err instanceof ApiError && err.status === 401)) return;
      }
      if (signal.aborted) return;
      onStatus("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 10_000);
    }
  }
}

export type StreamStatus = "connecting" | "live" | "reconnecting";

/** Checks a key before keeping it: resolves when the server accepts it. */
export const checkKey = (key: string): Promise<unknown> => new Api(key).json("/v1/pools");

// ---- What the server answers ----

/** `GET /v1/node`: this server as a fleet's front sees it (only what the page shows). */
export interface NodeInfo {
  node: { name: string; tag: string; version: string; startedAt: string };
  state: "starting" | "ready" | "draining";
  reason?: string;
  load: { sandboxes: number; capacity: number };
}

export type BuildStatus = "building" | "baked" | "cached" | "imported" | "failed" | "skipped" | "would-bake";

export interface ImageInfo {
  name: string;
  parent: string | null;
  children: string[];
  ref: string | null;
  module: string | null;
  key: string | null;
  cached: boolean;
  sizeBytes: number | null;
  pools: string[];
  build: { status: BuildStatus; step: string | null; updatedAt: string; ms: number | null; error: string | null } | null;
}

export interface ImagesResponse {
  project: { config: string; root: string } | null;
  images: ImageInfo[];
  updatedAt: string;
}

export interface Change {
  input: string;
  before: unknown;
  after: unknown;
}

export interface WhyResponse {
  name: string;
  key: string | null;
  cached: boolean;
  lastBake: { key: string; created: string } | null;
  changes: Change[];
  lastRebake: { at: string; from: string; to: string; changes: Change[] } | null;
}

export interface AcquireBucket {
  t: number;
  count: number;
  p50Ms: number | null;
  p99Ms: number | null;
}

export interface PoolInfo {
  name: string;
  image: string | null;
  stats: { alive: number; inUse: number; idle: number; waiting: number; min: number; max: number; memoryMib: number; vcpus: number };
  acquire: { bucketSeconds: number; buckets: AcquireBucket[] };
  cyclesPerSecond: number;
}

export interface SandboxInfo {
  id: string;
  pool: string;
  snapshot: string | null;
  metadata: Record<string, string>;
  startedAt: string;
  endAt: string;
  memoryMib: number;
  vcpus: number;
  state: "running" | "paused";
  execs: number;
  egressBytes: number;
}

interface EventBase {
  id: number;
  at: string;
}

export type BakeEvent = EventBase &
  { kind: "bake"; image: string } & (
    | { type: "start" }
    | { type: "progress"; step: string }
    | { type: "done"; status: BuildStatus; ms: number; key: string; error: string | null }
  );

export type WatchEvent = EventBase &
  { kind: "watch" } & (
    | { type: "change"; files: string[] }
    | { type: "round-start"; round: number; files: string[] }
    | { type: "round-done"; round: number; rekeyed: string[]; ms: number }
    | { type: "round-failed"; round: number; error: string }
  );

export type SandboxEvent = EventBase & { kind: "sandbox"; type: "created" | "killed" | "timed-out" | "vm-exited"; sandbox: string; pool: string };

export type ErrorEvent = EventBase & { kind: "error"; type: "request" | "create"; message: string; code: string | null };

export type ServerEvent = BakeEvent | WatchEvent | SandboxEvent | ErrorEvent;

export type EventKind = ServerEvent["kind"];
