// `supermachine/config`: the declarative layer. Users write image modules
// (`export default defineImage({ ... })`) and a supermachine.config.ts (`defineConfig({ ... })`);
// loadProject reads them for the CLI and the graph layer.
import type { ImageDefinition, ImageDefinitionFn, SupermachineConfig, SupermachineConfigFn } from "./types.js";

/**
 * Declares an image. Identity: the object (or function) is returned as is, so another module that
 * imports it and writes `from: it` is mapped back to this image.
 */
export function defineImage(def: ImageDefinition): ImageDefinition;
export function defineImage(fn: ImageDefinitionFn): ImageDefinitionFn;
export function defineImage(def: ImageDefinition | ImageDefinitionFn): ImageDefinition | ImageDefinitionFn {
  return def;
}

/** Declares the project: its images (globs of modules, or a record), pools and settings. Identity. */
export function defineConfig(config: SupermachineConfig): SupermachineConfig;
export function defineConfig(fn: SupermachineConfigFn): SupermachineConfigFn;
export function defineConfig(config: SupermachineConfig | SupermachineConfigFn): SupermachineConfig | SupermachineConfigFn {
  return config;
}

export type {
  ConfigEnv,
  ImageBase,
  ImageDecl,
  ImageDefinition,
  ImageDefinitionFn,
  ImageFields,
  LoadedProject,
  LoadProjectOptions,
  PoolDeclaration,
  ProjectImage,
  SupermachineConfig,
  SupermachineConfigFn,
} from "./types.js";
export type { ExtraFile, PoolOptions, WarmupVm } from "../spec/options.js";
export { ConfigError, type ConfigErrorDetails } from "./errors.js";
export { CONFIG_FILE_NAMES, findConfig, resolveConfigPath } from "./discover.js";
export { loadProject } from "./loader.js";
