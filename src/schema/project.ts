// The types of `supermachine/config`: what users write (ImageDefinition, SupermachineConfig) and
// what the loader hands the graph layer (LoadedProject). They live in spec beside the option
// types they are made of.
import type { BuildOptions, PoolOptions } from "./options.js";

/** What function forms of defineImage / defineConfig receive. */
export interface ConfigEnv {
  /** The CLI command being run (`build`, `up`, `watch`, ...), as passed to loadProject. */
  command: string;
  /** The config file's directory. */
  root: string;
}

/** Every build option of `Image.build` but `ref`, all optional. */
export interface ImageFields extends Omit<BuildOptions, "ref" | "name"> {
  /**
   * The image's name in the project: what pools and `from: "<name>"` refer to. Default: the
   * module's file name without its extension (the record key for `images: { ... }`).
   */
  name?: string;
}

/**
 * What an image builds on: another image's definition as its module exports it (imported:
 * `import python from "./python"`), or the name of an image of the project.
 */
export type ImageBase = ImageDefinition | ImageDefinitionFn | string;

/** An image: built from an OCI reference (`ref`) or on another image's snapshot (`from`), never both. */
export type ImageDefinition = ImageFields &
  (
    | { /** Image reference: `python:3-bookworm`, `oci:<dir>[:tag]`, `builtin:busybox`, ... */ ref: string; from?: undefined }
    | { /** The parent image: its baked snapshot is where this image's warmup starts. */ from: ImageBase; ref?: undefined }
  );

/** The function form: called once per load with the environment. */
export type ImageDefinitionFn = (env: ConfigEnv) => ImageDefinition;

/** A pool the project declares: image.pool() options plus the image's name. */
export interface PoolDeclaration extends PoolOptions {
  /** The name of an image of the project. */
  image: string;
}

export interface SupermachineConfig {
  /**
   * Glob patterns of image modules, relative to the config file (`["./sandboxes/*.ts"]`), each
   * module's default export an image; or a record of image name → definition.
   */
  images: string[] | Record<string, ImageDefinition | ImageDefinitionFn>;
  /** Named pools; a name must match [A-Za-z_][A-Za-z0-9_-]* and not shadow a member of the pools object. */
  pools?: Record<string, PoolDeclaration>;
  /** Where snapshots are kept (relative to the config file's directory). */
  snapshotsDir?: string;
  /** How many images may bake at once. */
  concurrency?: number;
  /**
   * A snapshot cache (a directory, relative to the config file's, or a registry repository
   * `host[:port]/repo`): `from` is imported from before baking (build, loadPools), `to` is
   * exported to after a build (docs/cache-format.md).
   */
  cache?: { from?: string; to?: string };
}

export type SupermachineConfigFn = (env: ConfigEnv) => SupermachineConfig | Promise<SupermachineConfig>;

/** A validated image definition, as the loader returns it: `from` resolved away, nothing defaulted. */
export interface ImageDecl extends ImageFields {
  ref?: string;
}

export interface ProjectImage {
  name: string;
  /** Absolute path of the module that declared it (the config file for record entries). */
  module: string;
  /** Validated definition: only what the user set (no defaults applied), extraFiles hostPaths absolute, `from` removed. */
  definition: ImageDecl;
  /** Parent image name (from `from`), or null when the image has `ref`. */
  from: string | null;
}

export interface LoadedProject {
  /** Absolute path of the config file. */
  configPath: string;
  /** The config file's directory. */
  root: string;
  /** In a deterministic order (glob order / record order). */
  images: ProjectImage[];
  /** Validated, nothing defaulted. */
  pools: Record<string, PoolDeclaration>;
  /** Absolute (a relative one is resolved against root). */
  snapshotsDir: string | undefined;
  concurrency: number | undefined;
  /** The config's snapshot cache, directories made absolute (against root). */
  cache: { from?: string; to?: string; trust?: "unsigned" | string[]; signingKey?: string };
  /** Every file the load read: the config, image modules and what they import (absolute; not inside node_modules). */
  dependencies: string[];
}

export interface LoadProjectOptions {
  /** Where to look for the config file, upward (default: process.cwd()). */
  cwd?: string;
  /** An explicit config file (or a directory holding one), relative to cwd; wins over the search. */
  configFile?: string;
  /** Passed to function forms as `env.command` (default: "build"). */
  command?: string;
}
