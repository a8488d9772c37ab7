// Where the config file is: an explicit path wins, else the first directory from cwd upward that
// holds one.
import { existsSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { ConfigError } from "./errors.js";

/** The names looked for, in this order within a directory. */
export const CONFIG_FILE_NAMES = ["supermachine.config.ts", "supermachine.config.mts", "supermachine.config.js", "supermachine.config.mjs"] as const;

const NAMES_TEXT = "supermachine.config.{ts,mts,js,mjs}";
const CREATE_HINT = "create supermachine.config.ts in the project's root (export default defineConfig({ images: [...] })), or pass --config <file>";

function isFile(p: string): boolean {
  try {
    return statSync(p).isFile();
  } catch {
    return false;
  }
}

function inDirectory(dir: string): string | undefined {
  for (const name of CONFIG_FILE_NAMES) {
    const p = join(dir, name);
    if (isFile(p)) return p;
  }
  return undefined;
}

/** The config file in `cwd` or the nearest parent directory holding one (absolute), or undefined. */
export function findConfig(cwd: string): string | undefined {
  let dir = resolve(cwd);
  for (;;) {
    const found = inDirectory(dir);
    if (found) return found;
    const parent = dirname(dir);
    if (parent === dir) return undefined;
    dir = parent;
  }
}

/**
 * The config file to load: `configFile` (a file, or a directory holding one) resolved against
 * cwd when given, else the search upward from cwd. Throws CONFIG_NOT_FOUND naming where it looked.
 */
export function resolveConfigPath(cwd: string, configFile?: string): string {
  const base = resolve(cwd);
  if (configFile !== undefined) {
    const p = resolve(base, configFile);
    if (isFile(p)) return p;
    if (existsSync(p) && statSync(p).isDirectory()) {
      const found = inDirectory(p);
      if (found) return found;
      throw new ConfigError("CONFIG_NOT_FOUND", `no ${NAMES_TEXT} in ${p} (given as the config)`, { hint: CREATE_HINT });
    }
    throw new ConfigError("CONFIG_NOT_FOUND", `config file ${p} does not exist`, { file: p, hint: "check the path given as the config file (--config)" });
  }
  const found = findConfig(base);
  if (found) return found;
  throw new ConfigError("CONFIG_NOT_FOUND", `no ${NAMES_TEXT} in ${base} or any parent directory`, { hint: CREATE_HINT });
}
