/**
 * Every error the library throws on purpose is a `SupermachineError`: a stable `code` that
 * programs can switch on, a message that names the input at fault, and a `hint` that says what
 * to do about it when we know. Each class lists its codes (`EXEC_ERROR_CODES`, ...) and types
 * `code` as their union, so a class can only be thrown with its own codes and a `switch` over
 * `err.code` can be exhaustive. test/unit/error-codes.test.ts checks that every listed code is
 * thrown somewhere, by its class.
 */
import { constants as osConstants } from "node:os";

export interface ErrorDetails {
  hint?: string;
  cause?: unknown;
}

export class SupermachineError<C extends string = string> extends Error {
  readonly code: C;
  readonly hint: string | undefined;

  constructor(code: C, message: string, details: ErrorDetails = {}) {
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

/** Whether `code` is one of `codes` (a class's code list). */
export function isCodeOf<T extends readonly string[]>(codes: T, code: string): code is T[number] {
  return codes.includes(code);
}

/** `what` must be one of `accepted`; used to build "expected one of" messages. */
export function listAccepted(accepted: readonly string[]): string {
  return accepted.map((a) => JSON.stringify(a)).join(", ");
}

export const SETUP_ERROR_CODES = [
  "SETUP_AGENT_MISMATCH", "SETUP_AGENT_MISSING", "SETUP_APT_FAILED", "SETUP_APT_NEEDS_ROOT", "SETUP_BUILD_FAILED", "SETUP_COMMAND_FAILED",
  "SETUP_DIST_MISSING", "SETUP_HOST_UNSUPPORTED", "SETUP_KERNEL_MISSING", "SETUP_MANIFEST_CORRUPT", "SETUP_MANIFEST_WRITE", "SETUP_PACKAGE_ROOT",
  "SETUP_QEMU_USER", "SQFSTAR_NOT_FOUND", "ZSTD_NOT_FOUND",
] as const;
export type SetupErrorCode = (typeof SETUP_ERROR_CODES)[number];
/** A build artifact (kernel, agent) or host tool the engine needs is missing. */
export class SetupError extends SupermachineError<SetupErrorCode> {}

export const REF_ERROR_CODES = ["REF_INVALID", "REF_NOT_LOCAL", "REF_TAG_TARGET_DIGEST", "REF_TAG_TARGET_INVALID", "REF_UNKNOWN_BUILTIN", "REF_UNSUPPORTED"] as const;
export type RefErrorCode = (typeof REF_ERROR_CODES)[number];
/** A reference string that cannot be parsed or resolved. */
export class RefError extends SupermachineError<RefErrorCode> {}

export const IMAGE_ERROR_CODES = [
  "IMAGE_ARCHIVE_AMBIGUOUS", "IMAGE_ARCHIVE_INVALID", "IMAGE_ARCHIVE_NOT_FOUND", "IMAGE_ARCHIVE_TAG_NOT_FOUND", "IMAGE_BLOB_MISSING",
  "IMAGE_BLOB_SIZE_MISMATCH", "IMAGE_BLOB_TOO_LARGE", "IMAGE_BLOB_TRUNCATED", "IMAGE_BUILTIN_MISSING", "IMAGE_CONFIG_INVALID",
  "IMAGE_DECOMPRESS_FAILED", "IMAGE_DESCRIPTOR_INVALID", "IMAGE_DIGEST_INVALID", "IMAGE_DIGEST_MISMATCH", "IMAGE_INDEX_EMPTY",
  "IMAGE_INDEX_INVALID", "IMAGE_INDEX_TOO_DEEP", "IMAGE_JSON_INVALID", "IMAGE_LAYER_COMPRESSION_UNSUPPORTED", "IMAGE_LAYER_INVALID",
  "IMAGE_LAYER_MEDIA_TYPE_UNSUPPORTED", "IMAGE_LAYER_NAME_TOO_LONG", "IMAGE_LAYER_TOO_LARGE", "IMAGE_LAYER_TOO_MANY_ENTRIES",
  "IMAGE_LAYER_UNSAFE", "IMAGE_LAYOUT_INVALID", "IMAGE_LAYOUT_NOT_FOUND", "IMAGE_LISTENER_TIMEOUT", "IMAGE_MANIFEST_INVALID",
  "IMAGE_MEDIA_TYPE_UNSUPPORTED", "IMAGE_NOT_PRESENT", "IMAGE_NO_WORKLOAD", "IMAGE_PIN_INVALID", "IMAGE_PLATFORM_MISMATCH", "IMAGE_PLATFORM_UNSUPPORTED",
  "IMAGE_SQUASHFS_FAILED", "IMAGE_TAG_NOT_FOUND", "IMAGE_TAG_REQUIRED", "SNAPSHOT_DAMAGED", "SNAPSHOT_HOST_MISMATCH", "SNAPSHOT_NOT_FOUND",
] as const;
export type ImageErrorCode = (typeof IMAGE_ERROR_CODES)[number];
/**
 * An image could not be read, verified or converted; or the snapshot an Image opens is missing,
 * damaged, or was made on another host (SNAPSHOT_HOST_MISMATCH: another QEMU, machine type,
 * accelerator or CPU model; also when a cache has an image only for another host).
 */
export class ImageError extends SupermachineError<ImageErrorCode> {}

export const ENGINE_ERROR_CODES = [
  "ENGINE_BOOT_TIMEOUT", "ENGINE_EXITED_DURING_BOOT", "ENGINE_FILE_ACCESS", "ENGINE_IDENTITY_FAILED", "ENGINE_MIGRATION_FAILED",
  "ENGINE_PENDING_USED", "ENGINE_PRESTART_NEEDS_STATE", "ENGINE_QEMU_USER_MISSING", "ENGINE_QEMU_USER_ROOT", "ENGINE_RESTORE_FAILED",
  "ENGINE_ROOTFS_MISSING", "ENGINE_RUNTIME_DIR_ACCESS", "ENGINE_SANDBOX_INACTIVE", "ENGINE_SANDBOX_UNAVAILABLE", "ENGINE_SNAPSHOT_EMPTY",
  "ENGINE_SNAPSHOT_ENV", "ENGINE_SNAPSHOT_INVALID", "ENGINE_SPAWN_FAILED", "ENGINE_VM_EXITED", "QMP_CHANNEL", "QMP_CLOSED",
  "QMP_COMMAND_FAILED", "QMP_PROTOCOL",
] as const;
export type EngineErrorCode = (typeof ENGINE_ERROR_CODES)[number];
/** The hypervisor process failed to start or died, or what it captured is unusable. */
export class EngineError extends SupermachineError<EngineErrorCode> {}

/** The agent's names for a stream error (PROTOCOL.md: STREAM_ERROR codes), and UNKNOWN for a code this host does not know. */
export const AGENT_STREAM_ERRORS = ["BAD_REQUEST", "STREAM_IN_USE", "IO", "NOT_FOUND", "TOO_LARGE", "UNSUPPORTED", "VERSION", "PROTOCOL", "REFUSED", "UNKNOWN"] as const;
export type AgentStreamErrorName = (typeof AGENT_STREAM_ERRORS)[number];
export const AGENT_ERROR_CODES = [
  "AGENT_CHANNEL", "AGENT_CHANNEL_CLOSED", "AGENT_CLOSED", "AGENT_FRAME_TOO_LARGE", "AGENT_HELLO_TIMEOUT", "AGENT_PING_TIMEOUT",
  "AGENT_PING_TOO_LARGE", "AGENT_PROCESS_EXITED", "AGENT_PROXY_STOPPED", "AGENT_STDIN_CLOSED", "AGENT_STREAM_ENDED",
  ...AGENT_STREAM_ERRORS.map((n) => `AGENT_${n}` as const),
] as const;
export type AgentErrorCode = (typeof AGENT_ERROR_CODES)[number];
/** The host-agent channel broke or the agent violated the protocol. */
export class AgentError extends SupermachineError<AgentErrorCode> {}

export const OPTION_ERROR_CODES = [
  "OPTION_ACCEL_INVALID", "OPTION_CPU_INVALID", "OPTION_EXTRA_FILE_INVALID", "OPTION_EXTRA_FILE_MISSING", "OPTION_FILE_TOO_LARGE", "OPTION_INVALID",
  "OPTION_MEMORY_INVALID", "OPTION_MISSING", "OPTION_REF_REQUIRED", "OPTION_UNKNOWN", "OPTION_VCPUS_INVALID",
] as const;
export type OptionErrorCode = (typeof OPTION_ERROR_CODES)[number];
/** An option passed to the public API has an invalid value. */
export class OptionError<C extends string = OptionErrorCode> extends SupermachineError<C> {}

export const NETWORK_ERROR_CODES = ["NETWORK_BAD_ALLOW", "NETWORK_BAD_HOSTS", "NETWORK_INVALID"] as const;
export type NetworkErrorCode = (typeof NETWORK_ERROR_CODES)[number];
/**
 * The `network` option (egress allowlist) is invalid: `NETWORK_BAD_ALLOW` (an `allow` entry),
 * `NETWORK_BAD_HOSTS` (a `hosts` entry), `NETWORK_INVALID` (the option's shape). An OptionError,
 * so callers that catch those catch it too.
 */
export class NetworkError extends OptionError<NetworkErrorCode> {}

export const POOL_ERROR_CODES = ["POOL_ACQUIRE_TIMEOUT", "POOL_NETWORK_FAILED", "POOL_SHUT_DOWN", "VM_DEAD", "VM_RELEASED"] as const;
export type PoolErrorCode = (typeof POOL_ERROR_CODES)[number];
/** Pool-level failures: shut down, acquire timeout, a VM released or dead. */
export class PoolError extends SupermachineError<PoolErrorCode> {}

export const STORE_ERROR_CODES = ["STORE_LOCK_TIMEOUT", "STORE_NO_SPACE"] as const;
export type StoreErrorCode = (typeof STORE_ERROR_CODES)[number];
/** The on-disk store (snapshots, image entries, blobs, names): an entry could not be published. */
export class StoreError extends SupermachineError<StoreErrorCode> {}

export const DEADLINE_ERROR_CODES = ["CALL_TIMEOUT"] as const;
export type DeadlineErrorCode = (typeof DEADLINE_ERROR_CODES)[number];
/** A call did not complete within its host-side deadline (the guest stopped answering?). */
export class DeadlineError extends SupermachineError<DeadlineErrorCode> {}

/** A guest errno's name (`ENOENT`, `EISDIR`, ...), as Node knows them. */
export type ErrnoName = keyof typeof osConstants.errno;
export const GUEST_FILE_ERROR_CODES = ["FILE_TOO_LARGE", ...(Object.keys(osConstants.errno) as ErrnoName[])] as const;
export type GuestFileErrorCode = "FILE_TOO_LARGE" | ErrnoName;
/** A file operation in the guest failed; `code` is the guest errno's name (`ENOENT`, `EISDIR`, ...) or FILE_TOO_LARGE. */
export class GuestFileError extends SupermachineError<GuestFileErrorCode> {
  constructor(
    code: GuestFileErrorCode,
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

export const EXEC_ERROR_CODES = [
  "EXEC_ALREADY_EXITED", "EXEC_NO_WORKLOAD", "EXEC_OUTPUT_LIMIT", "EXEC_PROCESS_EXITED", "EXEC_READ_SIZE", "EXEC_SNAPSHOT_UNSUPPORTED",
  "EXEC_STDIN_CLOSED", "EXEC_STREAM_IN_USE", "EXEC_USER_UNKNOWN",
] as const;
export type ExecErrorCode = (typeof EXEC_ERROR_CODES)[number];
/** A process in the guest could not be run or controlled as asked. */
export class ExecError extends SupermachineError<ExecErrorCode> {}

export const FORWARD_ERROR_CODES = ["TCP_CLIENT_CLOSED", "TCP_CLOSED", "TCP_LISTEN_FAILED", "TCP_PORT_IN_USE"] as const;
export type ForwardErrorCode = (typeof FORWARD_ERROR_CODES)[number];
/** A TCP forward (vm.exposeTcp, vm.vsockPath) could not be set up. */
export class ForwardError extends SupermachineError<ForwardErrorCode> {}

export const BAKE_ERROR_CODES = ["BAKE_EXTRA_FILE_CHANGED", "BAKE_EXTRA_FILE_FAILED", "BAKE_WARMUP_ENDED", "BAKE_WARMUP_FAILED"] as const;
export type BakeErrorCode = (typeof BAKE_ERROR_CODES)[number];
/** A bake (boot, extraFiles, warmup, capture of a snapshot) failed. */
export class BakeError extends SupermachineError<BakeErrorCode> {}

export const GRAPH_ERROR_CODES = [
  "GRAPH_BUNDLE_FAILED", "GRAPH_CHILD_OPTION", "GRAPH_CHILD_SHAPE", "GRAPH_CYCLE", "GRAPH_DUPLICATE_NAME", "GRAPH_NO_BASE",
  "GRAPH_OUTPUT_FAILED", "GRAPH_REF_AND_FROM", "GRAPH_UNKNOWN_IMAGE", "GRAPH_UNKNOWN_PARENT",
] as const;
export type GraphErrorCode = (typeof GRAPH_ERROR_CODES)[number];
/**
 * The image graph of a project is inconsistent (a cycle, an unknown parent, a child that changes
 * what its parent fixed), or `supermachine graph --output` could not write its file.
 */
export class GraphError extends SupermachineError<GraphErrorCode> {}

export const BUILD_ERROR_CODES = ["BUILD_ACCEL_UNSTABLE", "BUILD_FROZEN_DAMAGED", "BUILD_FROZEN_MISSING", "BUILD_FROZEN_UNPINNED", "BUILD_PARENT_FAILED", "BUILD_PARENT_NOT_BAKED"] as const;
export type BuildErrorCode = (typeof BUILD_ERROR_CODES)[number];
/** Building a project's images failed as a whole (e.g. `frozen` with images not baked). */
export class BuildError extends SupermachineError<BuildErrorCode> {}

export const CACHE_ERROR_CODES = [
  "CACHE_CHUNK_CORRUPT", "CACHE_CONFIG_INVALID", "CACHE_DIGEST_MISMATCH", "CACHE_ENGINE_MISMATCH", "CACHE_FORMAT_VERSION", "CACHE_INDEX_INVALID",
  "CACHE_KEY_INVALID", "CACHE_KEY_MISMATCH", "CACHE_KEY_UNUSABLE", "CACHE_LOCATION_INVALID", "CACHE_MANIFEST_INVALID", "CACHE_MISSING",
  "CACHE_SNAPSHOT_INVALID", "CACHE_TOO_LARGE", "CACHE_UNTRUSTED",
] as const;
export type CacheErrorCode = (typeof CACHE_ERROR_CODES)[number];
/**
 * A snapshot cache (a directory or a registry) could not be read or written, or served content
 * that failed verification; or its location (`cache.from`, `--to`) is not one.
 */
export class CacheError extends SupermachineError<CacheErrorCode> {}

export const SERVER_ERROR_CODES = [
  "SANDBOX_NODE_LOST", "SERVER_BAD_REQUEST", "SERVER_CONFLICT", "SERVER_DRAINING", "SERVER_FULL", "SERVER_KEYS_INVALID", "SERVER_KEY_UNKNOWN",
  "SERVER_LIMIT", "SERVER_LISTEN_FAILED", "SERVER_NO_NODE", "SERVER_NOT_FOUND", "SERVER_POOL_UNKNOWN", "SERVER_PROTOCOL", "SERVER_SANDBOX_GONE",
  "SERVER_STARTING", "SERVER_TLS_INVALID", "SERVER_UNAUTHORIZED", "SERVER_UNREACHABLE",
] as const;
export type ServerErrorCode = (typeof SERVER_ERROR_CODES)[number];
/**
 * A request `supermachine serve` refuses, a server that cannot start, or (in the remote client)
 * a server that cannot be reached or answers what no server of this version would. It lives
 * here, not in src/server, so the remote client raises the same class without the HTTP stack.
 */
export class ServerError extends SupermachineError<ServerErrorCode> {}

export const RUNTIME_ERROR_CODES = ["RUNTIME_PERMISSIONS", "RUNTIME_UNSUPPORTED"] as const;
export type RuntimeErrorCode = (typeof RUNTIME_ERROR_CODES)[number];
/**
 * The JavaScript runtime cannot run supermachine: a Node, Bun or Deno older than the release
 * that first has every API the library uses, or a Deno without the permissions it needs. Thrown
 * when the package is imported (src/js-runtime-check.ts), before anything could hang on it.
 */
export class RuntimeError extends SupermachineError<RuntimeErrorCode> {}
