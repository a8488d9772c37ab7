// The public surface of supermachine. Everything else under src/ is internal.
// First: a runtime that cannot run the library fails here, naming what it lacks.
import "./js-runtime-check.js";
export { Image } from "./runtime/image.js";
export { Pool, type PoolStats } from "./runtime/pool.js";
export { Vm } from "./runtime/vm.js";
export { loadPools, type LoadPoolsOptions, type Pools } from "./project/pools.js";
export { loadProject } from "./config/loader.js";
export { findConfig, CONFIG_FILE_NAMES } from "./config/discover.js";
export type { BuildEvent, BuiltImage, NodeStatus, FetchRequest, WatchEvent, WatchRound } from "./schema/events.js";
export type {
  ImageDefinition,
  ImageDefinitionFn,
  SupermachineConfig,
  SupermachineConfigFn,
  PoolDeclaration,
  LoadedProject,
  ProjectImage,
  ConfigEnv,
} from "./schema/project.js";
export { ExecChild, type ExecWaitResult } from "./session/exec-child.js";
export { TcpForwarder } from "./session/tcp.js";
export type { BuildOptions, PoolOptions } from "./schema/options.js";
export type { ExtraFile, ExecLimits } from "./schema/fields.js";
export type { ExecOptions, SpawnOptions, ExecOutput, StagedFileMode, Winsize, CallOptions, ReadFileOptions, WriteFileOptions, WarmupVm, ExecChildLike, BackgroundEntry, StatOptions, ReadDirOptions, MakeDirOptions, RemoveOptions, WatchDirOptions, FileInfo, DirEvent, DirWatch } from "./schema/calls.js";
export type { NetworkOption, NetworkObjectOption } from "./schema/network.js";
export { NETWORK_DEFAULTS } from "./schema/network.js";
export type { NetStats } from "./session/egress.js";
export { BUILD_DEFAULTS, POOL_DEFAULTS } from "./schema/options.js";
export { EXEC_DEFAULT_TIMEOUT_MS, FILE_LIMIT } from "./schema/calls.js";
export type { ImageConfig, ImageProgress, PullProgress, BakeProgress, BakeStep, BuildProgress } from "./schema/image.js";
export type { PullPolicy } from "./schema/fields.js";
export { tagImage } from "./image/tag.js";
export { exportSnapshots, importSnapshots, fetchFromCache } from "./project/cache.js";
export type { TransferReport, TransferEntry, TransferStatus, TransferProgress, TransferOptions, ImportOptions } from "./transfer/report.js";
export type { AccelChoice, Accel, EngineFingerprint, SnapshotInputs, SnapshotSources } from "./schema/key.js";
// Errors: every class a public function throws, each with its code list and the union of its codes.
export {
  SupermachineError,
  SetupError,
  RefError,
  ImageError,
  EngineError,
  AgentError,
  OptionError,
  NetworkError,
  PoolError,
  StoreError,
  DeadlineError,
  GuestFileError,
  ExecError,
  ForwardError,
  BakeError,
  GraphError,
  BuildError,
  CacheError,
  SETUP_ERROR_CODES,
  REF_ERROR_CODES,
  IMAGE_ERROR_CODES,
  ENGINE_ERROR_CODES,
  AGENT_STREAM_ERRORS,
  AGENT_ERROR_CODES,
  OPTION_ERROR_CODES,
  NETWORK_ERROR_CODES,
  POOL_ERROR_CODES,
  STORE_ERROR_CODES,
  DEADLINE_ERROR_CODES,
  GUEST_FILE_ERROR_CODES,
  EXEC_ERROR_CODES,
  FORWARD_ERROR_CODES,
  BAKE_ERROR_CODES,
  GRAPH_ERROR_CODES,
  BUILD_ERROR_CODES,
  CACHE_ERROR_CODES,
  type SetupErrorCode,
  type RefErrorCode,
  type ImageErrorCode,
  type EngineErrorCode,
  type AgentStreamErrorName,
  type AgentErrorCode,
  type OptionErrorCode,
  type NetworkErrorCode,
  type PoolErrorCode,
  type StoreErrorCode,
  type DeadlineErrorCode,
  type ErrnoName,
  type GuestFileErrorCode,
  type ExecErrorCode,
  type ForwardErrorCode,
  type BakeErrorCode,
  type GraphErrorCode,
  type BuildErrorCode,
  type CacheErrorCode,
  RuntimeError,
  RUNTIME_ERROR_CODES,
  type RuntimeErrorCode,
  type ErrorDetails,
} from "./errors.js";
export { ConfigError, CONFIG_ERROR_CODES, type ConfigErrorCode } from "./config/errors.js";
export { RegistryError, REGISTRY_ERROR_CODES, type RegistryErrorCode } from "./registry/errors.js";
export { ServerError, SERVER_ERROR_CODES, type ServerErrorCode } from "./server/errors.js";
export type { ServeOptions, SupermachineServer } from "./server/index.js";

/**
 * Starts `supermachine serve` in this process: listens, loads the project's pools, serves them
 * (see docs/serve.md). The HTTP stack loads only when this is called.
 */
export async function startServer(options?: import("./server/index.js").ServeOptions): Promise<import("./server/index.js").SupermachineServer> {
  return (await import("./server/index.js")).startServer(options);
}
export type { FrontOptions, SupermachineFront } from "./server/front/index.js";
export type { NodeReport } from "./server/node.js";

/**
 * Starts `supermachine serve --front` in this process: a stateless front over a fleet of serve
 * nodes (see docs/scale-out.md). The HTTP stack loads only when this is called.
 */
export async function startFront(options: import("./server/front/index.js").FrontOptions): Promise<import("./server/front/index.js").SupermachineFront> {
  return (await import("./server/front/index.js")).startFront(options);
}
export type { RemotePools, RemotePool, RemoteVm, RemoteExecChild, RemoteTcpForwarder, ConnectOptions, AcquireOptions, RemotePoolStats, RemoteWaitResult, SandboxInfo, SnapshotInfo } from "./remote/index.js";

/**
 * Connects to a `supermachine serve` server: its pools by name, with the interface of what
 * `loadPools()` returns (see docs/serve.md, "The remote client"). The client (fetch and
 * WebSockets) loads only when this is called.
 */
export async function connect(url: string, options?: import("./remote/index.js").ConnectOptions): Promise<import("./remote/index.js").RemotePools> {
  return (await import("./remote/index.js")).connect(url, options);
}
