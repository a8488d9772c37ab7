// `supermachine/config`: what image modules and supermachine.config.ts import. Kept light (the
// definers and types; no loader), since every image module imports it. The loader is
// loadProject in `supermachine` (src/config/loader.ts).
import type { ImageDefinition, ImageDefinitionFn, SupermachineConfig, SupermachineConfigFn } from "../schema/project.js";

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
} from "../schema/project.js";
export type { PoolOptions } from "../schema/options.js";
export type { ExtraFile } from "../schema/fields.js";
export type { WarmupVm } from "../schema/calls.js";
export { ConfigError, type ConfigErrorDetails } from "./errors.js";
