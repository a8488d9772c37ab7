// The public surface of supermachine. Everything else under src/ is internal.
export { Image } from "./runtime/image.js";
export { Pool, type PoolStats } from "./runtime/pool.js";
export { Vm } from "./runtime/vm.js";
export { loadPools, type LoadPoolsOptions, type Pools } from "./runtime/pools.js";
export { loadProject } from "./config/loader.js";
export { findConfig, CONFIG_FILE_NAMES } from "./config/discover.js";
export { ConfigError } from "./config/errors.js";
export type { BuildEvent, BuiltNode, NodeStatus } from "./build/build.js";
export type {
  ImageDefinition,
  ImageDefinitionFn,
  SupermachineConfig,
  SupermachineConfigFn,
  PoolDeclaration,
  LoadedProject,
  ProjectImage,
  ConfigEnv,
} from "./spec/project.js";
export { ExecChild, type ExecWaitResult } from "./guest/exec-child.js";
export { TcpForwarder } from "./guest/tcp.js";
export type {
  BuildOptions,
  PoolOptions,
  ExecOptions,
  SpawnOptions,
  ExecOutput,
  ExtraFile,
  StagedFileMode,
  Winsize,
  CallOptions,
  ReadFileOptions,
  WriteFileOptions,
  WarmupVm,
  ExecChildLike,
  ExecLimits,
} from "./spec/options.js";
export type { BackgroundEntry } from "./agent/client.js";
export type { NetworkOption, NetworkObjectOption } from "./spec/network.js";
export { NETWORK_DEFAULTS } from "./spec/network.js";
export type { NetStats } from "./guest/egress.js";
export { BUILD_DEFAULTS, POOL_DEFAULTS, EXEC_DEFAULT_TIMEOUT_MS, FILE_LIMIT } from "./spec/options.js";
export type { ImageConfig, ImageProgress, PullProgress, BakeProgress, BakeStep, BuildProgress } from "./spec/image.js";
export type { PullPolicy } from "./image/store.js";
export { RegistryError } from "./registry/errors.js";
export { tagImage } from "./image/tag.js";
export { exportSnapshots, importSnapshots, fetchFromCache, CacheError } from "./transfer/index.js";
export type { TransferReport, TransferEntry, TransferStatus, TransferProgress, TransferOptions, ImportOptions } from "./transfer/index.js";
export type { FetchRequest } from "./build/build.js";
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
