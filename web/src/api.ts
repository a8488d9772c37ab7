/**
 * The page's side of the HTTP API of `supermachine serve`: JSON requests carrying the API key in
 * `X-API-KEY`, the key's place in sessionStorage, and the event stream (Server-Sent Events read
 * from a `fetch` body, because EventSource cannot send the key header).
 */
import { createParser } from "eventsource-parser";
import type { z } from "zod";
import type * as wire from "../../src/server/native/schemas.ts";
import type { ServerEvent } from "../../src/schema/server-events.ts";

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
// The server's own schemas (src/server/native/schemas.ts, zod) and event types: the page is
// type-checked against what the server sends, and nothing of them is bundled (types only).

type Answer<T extends z.ZodType> = z.output<T>;

/** `GET /v1/node`: this server as a fleet's front sees it. */
export type NodeInfo = Answer<typeof wire.nodeReport>;
export type ImagesResponse = Answer<typeof wire.imageList>;
export type ImageInfo = ImagesResponse["images"][number];
export type WhyResponse = Answer<typeof wire.whyReport>;
export type Change = WhyResponse["changes"][number];
export type PoolInfo = Answer<typeof wire.poolInfo>;
export type AcquireBucket = PoolInfo["acquire"]["buckets"][number];
export type SandboxInfo = Answer<typeof wire.sandboxInfo>;
export type BuildStatus = NonNullable<ImageInfo["build"]>["status"];

export type { ServerEvent };
export type BakeEvent = Extract<ServerEvent, { kind: "bake" }>;
export type WatchEvent = Extract<ServerEvent, { kind: "watch" }>;
export type SandboxEvent = Extract<ServerEvent, { kind: "sandbox" }>;
export type ErrorEvent = Extract<ServerEvent, { kind: "error" }>;

export type EventKind = ServerEvent["kind"];
