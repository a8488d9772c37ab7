/**
 * Errors of `supermachine serve` and its clients: authentication, limits, unknown sandboxes or
 * pools, bad requests, a draining server, the key file. The HTTP layer maps each code to a status
 * (see `statusOf` in http.ts); the body carries the code, so a client can switch on it as on the
 * library's own.
 */
import { SupermachineError } from "../errors.js";

export const SERVER_ERROR_CODES = [
  "SERVER_BAD_REQUEST", "SERVER_CONFLICT", "SERVER_DRAINING", "SERVER_KEYS_INVALID", "SERVER_KEY_UNKNOWN", "SERVER_LIMIT", "SERVER_LISTEN_FAILED",
  "SERVER_NOT_FOUND", "SERVER_POOL_UNKNOWN", "SERVER_SANDBOX_GONE", "SERVER_STARTING", "SERVER_TLS_INVALID", "SERVER_UNAUTHORIZED",
] as const;
export type ServerErrorCode = (typeof SERVER_ERROR_CODES)[number];

/** A request the server refuses, or a server that cannot start. */
export class ServerError extends SupermachineError<ServerErrorCode> {}
