/**
 * Library and server errors as Connect errors, with the codes the E2B SDKs react to: `not_found`
 * (a missing file or process: `exists()` is false, `kill()` returns false), `already_exists`
 * (`makeDir` returns false), `invalid_argument`, `resource_exhausted`, `unavailable` (the VM is
 * gone), `deadline_exceeded`. The message keeps the library's, with its code in front.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { SupermachineError } from "../../errors.js";

const BY_CODE: Record<string, Code> = {
  ENOENT: Code.NotFound,
  ENOTDIR: Code.InvalidArgument,
  EISDIR: Code.InvalidArgument,
  EEXIST: Code.AlreadyExists,
  EACCES: Code.PermissionDenied,
  EPERM: Code.PermissionDenied,
  ENOTEMPTY: Code.FailedPrecondition,
  ENOSPC: Code.ResourceExhausted,
  FILE_TOO_LARGE: Code.ResourceExhausted,
  SERVER_NOT_FOUND: Code.NotFound,
  SERVER_CONFLICT: Code.AlreadyExists,
  SERVER_SANDBOX_GONE: Code.Unavailable,
  ENAMETOOLONG: Code.InvalidArgument,
  EINVAL: Code.InvalidArgument,
  EXDEV: Code.FailedPrecondition,
  ELOOP: Code.InvalidArgument,
  SERVER_BAD_REQUEST: Code.InvalidArgument,
  SERVER_LIMIT: Code.ResourceExhausted,
  SERVER_DRAINING: Code.Unavailable,
  VM_DEAD: Code.Unavailable,
  VM_RELEASED: Code.NotFound,
  CALL_TIMEOUT: Code.DeadlineExceeded,
  EXEC_ALREADY_EXITED: Code.NotFound,
  EXEC_USER_UNKNOWN: Code.InvalidArgument,
};

export function toConnectError(err: unknown): ConnectError {
  if (err instanceof ConnectError) return err;
  if (err instanceof SupermachineError) {
    const code = BY_CODE[err.code] ?? (err.code.startsWith("OPTION_") ? Code.InvalidArgument : Code.Internal);
    return new ConnectError(`${err.code}: ${err.message}${err.hint ? ` (hint: ${err.hint})` : ""}`, code, undefined, undefined, err);
  }
  if (err instanceof Error && err.name === "AbortError") return new ConnectError(err.message, Code.Canceled);
  return new ConnectError(err instanceof Error ? err.message : String(err), Code.Internal, undefined, undefined, err);
}

/** Runs a handler body with its failures as Connect errors. */
export async function connectCall<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw toConnectError(err);
  }
}
