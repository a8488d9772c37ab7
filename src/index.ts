// The public surface of supermachine. Everything else under src/ is internal.
export { Image } from "./runtime/image.js";
export { Pool, type PoolStats } from "./runtime/pool.js";
export { Vm, ExecError } from "./runtime/vm.js";
export type {
  BuildOptions,
  PoolOptions,
  ExecOptions,
  ExecOutput,
  ExtraFile,
  StagedFileMode,
} from "./runtime/options.js";
export type { ImageConfig } from "./image/oci-layout.js";
export type { ImageProgress, PullPolicy } from "./image/store.js";
export { RegistryError } from "./registry/errors.js";
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
} from "./errors.js";
