/**
 * Every error the library throws on purpose is a `SupermachineError`: a stable `code` that
 * programs can switch on, a message that names the input at fault, and a `hint` that says what
 * to do about it when we know.
 */
export interface ErrorDetails {
  hint?: string;
  cause?: unknown;
}

export class SupermachineError extends Error {
  readonly code: string;
  readonly hint: string | undefined;

  constructor(code: string, message: string, details: ErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = new.target.name;
    this.code = code;
    this.hint = details.hint;
  }

  /** Message plus hint, as the CLI prints it. */
  describe(): string {
    return this.hint ? `${this.message}\n  hint: ${this.hint}` : this.message;
  }
}

/** A build artifact (kernel, agent) or host tool the engine needs is missing. */
export class SetupError extends SupermachineError {}

/** A reference string that cannot be parsed or resolved. */
export class RefError extends SupermachineError {}

/** An image could not be read, verified or converted. */
export class ImageError extends SupermachineError {}

/** The hypervisor process failed to start or died. */
export class EngineError extends SupermachineError {}

/** The host-agent channel broke or the agent violated the protocol. */
export class AgentError extends SupermachineError {}

/** An option passed to the public API has an invalid value. */
export class OptionError extends SupermachineError {}

/**
 * The `network` option (egress allowlist) is invalid: `NETWORK_BAD_ALLOW` (an `allow` entry),
 * `NETWORK_BAD_HOSTS` (a `hosts` entry), `NETWORK_INVALID` (the option's shape). An OptionError,
 * so callers that catch those catch it too.
 */
export class NetworkError extends OptionError {}

/** Pool-level failures: shut down, acquire timeout. */
export class PoolError extends SupermachineError {}

/** The on-disk stores (images, blobs, refs, snapshots): an entry could not be published. */
export class StoreError extends SupermachineError {}

/** `what` must be one of `accepted`; used to build "expected one of" messages. */
export function listAccepted(accepted: readonly string[]): string {
  return accepted.map((a) => JSON.stringify(a)).join(", ");
}

/** A call did not complete within its host-side deadline (the guest stopped answering?). */
export class DeadlineError extends SupermachineError {}

/** A file operation in the guest failed; `code` is the guest errno's name (`ENOENT`, `EISDIR`, ...). */
export class GuestFileError extends SupermachineError {
  constructor(
    code: string,
    message: string,
    /** The guest path. */
    readonly path: string,
    /** The guest errno, when the guest gave one. */
    readonly errno: number | undefined,
    details: ErrorDetails = {},
  ) {
    super(code, message, details);
  }
}

/** A process in the guest could not be run or controlled as asked. */
export class ExecError extends SupermachineError {}

/** A TCP forward (vm.exposeTcp, vm.vsockPath) could not be set up. */
export class ForwardError extends SupermachineError {}

/** A bake (boot, extraFiles, warmup, capture of a snapshot) failed. */
export class BakeError extends SupermachineError {}

/** The image graph of a project is inconsistent (a cycle, an unknown parent, a child that changes what its parent fixed). */
export class GraphError extends SupermachineError {}

/** Building a project's images failed as a whole (e.g. `frozen` with images not baked). */
export class BuildError extends SupermachineError {}
