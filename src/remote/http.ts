/**
 * How the remote client talks to `supermachine serve`: JSON and byte-stream requests with the API
 * key (fetch, Node's built-in undici), WebSockets with the same key (ws), and the server's error
 * bodies turned back into the library's error classes, with the server's code and hint, so a
 * program catches the same errors as when it runs locally.
 */
import WebSocket from "ws";
import * as E from "../errors.js";

/** What fetch takes as a body (the DOM's BodyInit, which Node's types do not name globally). */
export type RequestBody = NonNullable<RequestInit["body"]>;

type ErrorClass = new (code: string, message: string, details?: E.ErrorDetails) => E.SupermachineError;

const BY_LIST: Array<[readonly string[], ErrorClass]> = [
  [E.SERVER_ERROR_CODES, E.ServerError as ErrorClass],
  [E.POOL_ERROR_CODES, E.PoolError as ErrorClass],
  [E.EXEC_ERROR_CODES, E.ExecError as ErrorClass],
  [E.FORWARD_ERROR_CODES, E.ForwardError as ErrorClass],
  [E.DEADLINE_ERROR_CODES, E.DeadlineError as ErrorClass],
  [E.NETWORK_ERROR_CODES, E.NetworkError as ErrorClass],
  [E.OPTION_ERROR_CODES, E.OptionError as ErrorClass],
  [E.AGENT_ERROR_CODES, E.AgentError as ErrorClass],
  [E.ENGINE_ERROR_CODES, E.EngineError as ErrorClass],
  [E.IMAGE_ERROR_CODES, E.ImageError as ErrorClass],
  [E.STORE_ERROR_CODES, E.StoreError as ErrorClass],
  [E.BAKE_ERROR_CODES, E.BakeError as ErrorClass],
  [E.BUILD_ERROR_CODES, E.BuildError as ErrorClass],
  [E.GRAPH_ERROR_CODES, E.GraphError as ErrorClass],
  [E.CACHE_ERROR_CODES, E.CacheError as ErrorClass],
  [E.SETUP_ERROR_CODES, E.SetupError as ErrorClass],
  [E.REF_ERROR_CODES, E.RefError as ErrorClass],
];

/** The error a server reported, as the class the library throws for its code. */
export function errorFrom(code: string | undefined, message: string, hint: string | undefined, context: { path?: string } = {}): E.SupermachineError {
  // The server prefixes the message with its code; the error's own message does not repeat it.
  const text = code && message.startsWith(`${code}: `) ? message.slice(code.length + 2) : message;
  const details = hint ? { hint } : {};
  if (code && (E.GUEST_FILE_ERROR_CODES as readonly string[]).includes(code)) {
    return new E.GuestFileError(code as E.GuestFileErrorCode, text, context.path ?? "", undefined, details);
  }
  for (const [list, cls] of BY_LIST) if (code && list.includes(code)) return new cls(code, text, details);
  return new E.SupermachineError(code ?? "SERVER_PROTOCOL", text, details);
}

export interface Endpoint {
  /** `http(s)://host:port`, without a trailing slash. */
  url: string;
  apiKey: string;
  /** Aborts every request of the client (connect's `signal`). */
  signal?: AbortSignal | undefined;
}

const authHeaders = (ep: Endpoint): Record<string, string> => ({ "x-api-key": ep.apiKey });

function unreachable(ep: Endpoint, what: string, err: unknown): E.ServerError {
  const cause = (err as { cause?: { code?: string; message?: string } }).cause;
  return new E.ServerError("SERVER_UNREACHABLE", `${what}: cannot reach ${ep.url}: ${cause?.message ?? (err as Error).message}`, {
    hint: "check that `supermachine serve` runs there and the URL (scheme, host, port) is right",
    cause: err,
  });
}

/** The error of a response that is not 2xx. */
export async function responseError(res: Response, what: string, context: { path?: string } = {}): Promise<E.SupermachineError> {
  const text = await res.text().catch(() => "");
  let body: { message?: unknown; errorCode?: unknown; hint?: unknown } | undefined;
  try {
    body = JSON.parse(text) as typeof body;
  } catch {
    body = undefined;
  }
  if (!body || typeof body.message !== "string") {
    return new E.ServerError("SERVER_PROTOCOL", `${what}: the server answered ${res.status} ${res.statusText}${text ? `: ${text.slice(0, 200)}` : ""}`, {
      hint: "is the URL a supermachine server (or a proxy in front of one)?",
    });
  }
  return errorFrom(typeof body.errorCode === "string" ? body.errorCode : undefined, `${what}: ${body.message}`, typeof body.hint === "string" ? body.hint : undefined, context);
}

export interface RequestOptions {
  method?: string;
  json?: unknown;
  body?: RequestBody | AsyncIterable<Uint8Array>;
  query?: Record<string, string | undefined>;
  signal?: AbortSignal | undefined;
  /** For errors about a guest file. */
  path?: string;
}

/** A request; rejects with the server's error when the status is not 2xx. */
export async function request(ep: Endpoint, path: string, what: string, o: RequestOptions = {}): Promise<Response> {
  const url = new URL(ep.url + path);
  for (const [k, v] of Object.entries(o.query ?? {})) if (v !== undefined) url.searchParams.set(k, v);
  const headers: Record<string, string> = authHeaders(ep);
  let body: RequestBody | undefined;
  if (o.json !== undefined) {
    headers["content-type"] = "application/json";
    body = JSON.stringify(o.json);
  } else if (o.body !== undefined) {
    headers["content-type"] = "application/octet-stream";
    body = o.body as RequestBody;
  }
  const signals = [o.signal, ep.signal].filter((s): s is AbortSignal => s !== undefined);
  let res: Response;
  try {
    res = await fetch(url, {
      method: o.method ?? "GET",
      headers,
      ...(body !== undefined ? { body } : {}),
      // A streamed body needs half duplex (undici); harmless for the others.
      ...(o.body !== undefined && typeof o.body !== "string" && !(o.body instanceof Uint8Array) ? { duplex: "half" } : {}),
      ...(signals.length ? { signal: signals.length === 1 ? signals[0] : AbortSignal.any(signals) } : {}),
    } as RequestInit);
  } catch (err) {
    if ((err as Error).name === "AbortError" || signals.some((s) => s.aborted)) throw signals.find((s) => s.aborted)?.reason ?? err;
    throw unreachable(ep, what, err);
  }
  if (!res.ok) throw await responseError(res, what, o.path !== undefined ? { path: o.path } : {});
  return res;
}

export async function requestJson<T>(ep: Endpoint, path: string, what: string, o: RequestOptions = {}): Promise<T> {
  const res = await request(ep, path, what, o);
  if (res.status === 204) return undefined as T;
  try {
    return (await res.json()) as T;
  } catch (err) {
    throw new E.ServerError("SERVER_PROTOCOL", `${what}: the server's answer is not JSON: ${(err as Error).message}`, { hint: "is the URL a supermachine server?", cause: err });
  }
}

/**
 * Opens a WebSocket to `path`; resolves once it is open, rejects with the server's error when the
 * upgrade is refused (the HTTP answer carries the usual error body).
 */
export function openSocket(ep: Endpoint, path: string, what: string): Promise<WebSocket> {
  const url = ep.url.replace(/^http/, "ws") + path;
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { headers: authHeaders(ep), perMessageDeflate: false, maxPayload: 16 * 1024 * 1024 });
    const onAbort = () => ws.terminate();
    ep.signal?.addEventListener("abort", onAbort, { once: true });
    ws.once("open", () => {
      ws.off("error", onError);
      ws.on("error", () => {});
      resolve(ws);
    });
    const onError = (err: Error) => {
      ep.signal?.removeEventListener("abort", onAbort);
      reject(ep.signal?.aborted ? ep.signal.reason : unreachable(ep, what, err));
    };
    ws.once("error", onError);
    ws.once("unexpected-response", (_req, res) => {
      ws.off("error", onError);
      ws.on("error", () => {});
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () => {
        ws.terminate();
        const r = new Response(Buffer.concat(chunks), { status: res.statusCode ?? 500, statusText: res.statusMessage ?? "" });
        void responseError(r, what).then(reject, reject);
      });
      res.on("error", (err: Error) => reject(unreachable(ep, what, err)));
    });
  });
}
