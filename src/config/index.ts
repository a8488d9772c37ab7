// `supermachine/config`: the declarative layer (defineImage modules and supermachine.config.ts).
// This version declares images by reference only; warmup layers and the resolver graph come
// with the declarative-layer work.
import type { BuildOptions } from "../spec/options.js";

export interface ImageDefinition extends BuildOptions {}

export interface SupermachineConfig {
  images: Record<string, ImageDefinition>;
}

/** Identity helper that gives a config module its types. */
export function defineImage(def: ImageDefinition): ImageDefinition {
  return def;
}

export function defineConfig(config: SupermachineConfig): SupermachineConfig {
  return config;
}
