// The public surface of supermachine. Everything else under src/ is internal.
export { Image } from "./runtime/image.js";
export { Pool, type PoolStats } from "./runtime/pool.js";
export { Vm } from "./runtime/vm.js";
export { loadPools, type LoadPoolsOptions, type Pools } from "./project/pools.js";
export { loadProject } from "./config/loader.js";
export { findConfig, CONFIG_FILE_NAMES } from "./config/discover.js";
export { ConfigError } from "./config/errors.js";
export type { BuildEvent, BuiltNode, NodeStatus } from "./project/build.js";
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
export type { ExecOptions, SpawnOptions, ExecOutput, StagedFileMode, Winsize, CallOptions, ReadFileOptions, WriteFileOptions, WarmupVm, ExecChildLike } from "./schema/calls.js";
export type { BackgroundEntry } from "./agent/client.js";
export type { NetworkOption, NetworkObjectOption } from "./schema/network.js";
export { NETWORK_DEFAULTS } from "./schema/network.js";
export type { NetStats } from "./session/egress.js";
export { BUILD_DEFAULTS, POOL_DEFAULTS } from "./schema/options.js";
export { EXEC_DEFAULT_TIMEOUT_MS, FILE_LIMIT } from "./schema/calls.js";
export type { ImageConfig, ImageProgress, PullProgress, BakeProgress, BakeStep, BuildProgress } from "./schema/image.js";
export type { PullPolicy } from "./image/resolve.js";
export { RegistryError } from "./registry/errors.js";
export { tagImage } from "./image/tag.js";
export { exportSnapshots, CacheError } from "./transfer/index.js";
export { importSnapshots, fetchFromCache } from "./project/cache.js";
export type { TransferReport, TransferEntry, TransferStatus, TransferProgress, TransferOptions, ImportOptions } from "./transfer/index.js";
export type { FetchRequest } from "./project/build.js";
export type { LoadedSnapshot } from "./store/snapshots.js";
export type { AccelChoice, Accel } from "./engine/accel.js";
export {
  SupermachineError,
  SetupError,
  RefError,
  ImageError,
  EngineError,
  AgentError,
  OptionError,
  PoolError,
  StoreError,
  ExecError,
  ForwardError,
  GuestFileError,
  DeadlineError,
  BakeError,
  NetworkError,
} from "./errors.js";
