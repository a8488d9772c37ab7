// loadProject: finds and loads supermachine.config.ts and the image modules it lists, validates
// them, and maps each `from` to an image name. What it returns is the graph layer's input.
import { realpathSync } from "node:fs";
import { basename, dirname, extname, relative, resolve } from "node:path";
import { glob } from "tinyglobby";
import { OptionError } from "../errors.js";
import { configSchema, imageDefinitionSchema, IMAGE_NAME, isDefinitionLike, isPlainObject } from "../schema/config.js";
import { describe, parseOptions } from "../schema/parse.js";
import { logger } from "../debug.js";
import { resolveConfigPath } from "./discover.js";
import { ConfigError } from "./errors.js";
import { openModules, type ModuleSession } from "./modules.js";
import { registerProject } from "./registry.js";
import { parseCacheLocation } from "../oci/cache-location.js";
import type { ConfigEnv, ImageDecl, LoadedProject, LoadProjectOptions, ProjectImage } from "../schema/project.js";
import type { z } from "zod";

const log = logger("config");

/** What a glob may match: modules jiti loads. Declaration files (.d.ts) are skipped. */
const MODULE_EXTENSIONS = [".ts", ".mts", ".cts", ".js", ".mjs", ".cjs"];
const DECLARATION_FILE = /\.d\.[cm]?ts$/;

const IMAGE_HINT = 'an image module ends with export default defineImage({ ref: "..." }) (or a function of the environment returning one)';

let queue: Promise<unknown> = Promise.resolve();

/**
 * Loads the project: the config file (`configFile`, else found upward from `cwd`), the image
 * modules it lists, their imports. Every call loads the files afresh. Throws ConfigError.
 */
export function loadProject(options: LoadProjectOptions = {}): Promise<LoadedProject> {
  // A load purges what it put in Node's require cache when it ends (modules.ts): one at a time.
  const run = queue.then(() => load(options));
  queue = run.catch(() => undefined);
  return run;
}

/** A declared image before validation. */
interface Entry {
  /** Absolute path of the declaring module. */
  module: string;
  /** The module's path relative to the project root, for messages. */
  rel: string;
  /** The value as exported: what another module's `from` holds when it imports it. */
  exported: unknown;
  /** The record key (record form). */
  key?: string;
}

interface Declared extends Entry {
  name: string;
  decl: z.output<typeof imageDefinitionSchema>;
}

async function load({ cwd = process.cwd(), configFile, command = "build" }: LoadProjectOptions): Promise<LoadedProject> {
  const configPath = realpath(resolveConfigPath(cwd, configFile));
  const root = dirname(configPath);
  const env: ConfigEnv = { command, root };
  const rel = (p: string) => relative(root, p) || basename(p);
  const started = Date.now();
  const modules = openModules(configPath);
  let result: Omit<LoadedProject, "dependencies">;
  let dependencies: string[];
  try {
    const config = await loadConfig(modules, configPath, rel(configPath), env);
    let entries: Entry[];
    if (Array.isArray(config.images)) {
      const files = await globModules(root, configPath, rel, config.images);
      entries = [];
      for (const file of files) entries.push({ module: file, rel: rel(file), exported: await importDefault(modules, file, rel(file), "image") });
    } else {
      entries = Object.entries(config.images).map(([key, exported]) => ({ module: configPath, rel: rel(configPath), exported, key }));
    }
    result = {
      configPath,
      root,
      images: await declareImages(entries, env, Array.isArray(config.images) ? config.images : undefined),
      pools: config.pools ?? {},
      snapshotsDir: config.snapshotsDir === undefined ? undefined : resolve(root, config.snapshotsDir),
      concurrency: config.concurrency,
      cache: resolveCache(config.cache, root, configPath, rel(configPath)),
    };
  } finally {
    dependencies = modules.close();
  }
  if (!dependencies.includes(configPath)) dependencies = [...dependencies, configPath].sort();
  log(
    "loaded %s in %d ms: images %s; %d files",
    configPath,
    Date.now() - started,
    result.images.map((i) => (i.from ? `${i.name} <- ${i.from}` : i.name)).join(", ") || "(none)",
    dependencies.length,
  );
  registerProject(configPath, result.snapshotsDir ?? null); // for gc --all-configs
  return { ...result, dependencies };
}

async function loadConfig(modules: ModuleSession, file: string, rel: string, env: ConfigEnv) {
  let value = await importDefault(modules, file, rel, "config");
  if (typeof value === "function") {
    const fn = value as (env: ConfigEnv) => unknown;
    value = await callUser(() => fn(env), file, `${rel}: the config function`);
  }
  if (!isPlainObject(value)) {
    throw new ConfigError("CONFIG_INVALID_MODULE", `${rel}: the default export must be a config (an object, or a function returning one), got ${describe(value)}`, {
      file,
      hint: "end the config file with export default defineConfig({ images: [...], pools: { ... } })",
    });
  }
  // A "__proto__" key would silently vanish: `{ __proto__: {...} }` sets the object's prototype,
  // and the schema's records drop an own "__proto__" key (computed: `{ ["__proto__"]: ... }`).
  for (const field of ["pools", "images"] as const) {
    const v = value[field];
    if (v === null || typeof v !== "object" || Array.isArray(v)) continue;
    const hint = 'pick another name: "__proto__" names an object\'s prototype';
    if (!isPlainObject(v)) {
      throw new ConfigError("OPTION_INVALID", `${rel}: ${field} must be an object literal, got ${describe(v)}`, {
        file,
        hint: `a key written __proto__: sets the object's prototype instead of naming an entry; ${hint}`,
      });
    }
    if (Object.prototype.hasOwnProperty.call(v, "__proto__")) {
      throw new ConfigError("OPTION_INVALID", `${rel}: key of ${field} cannot be "__proto__"`, { file, hint });
    }
  }
  return validate(rel, configSchema, value, file);
}

async function globModules(root: string, configPath: string, rel: (p: string) => string, patterns: string[]): Promise<string[]> {
  if (patterns.length === 0) return [];
  const matched = await glob(patterns, { cwd: root, absolute: true, onlyFiles: true, ignore: ["**/node_modules/**"] });
  // Real paths, as jiti resolves imports: a module globbed and imported is then one module. The
  // config file itself is not an image, even when a pattern such as "./*.ts" matches it.
  const files = [...new Set(matched.filter((f) => !DECLARATION_FILE.test(f)).map(realpath))]
    .filter((f) => f !== configPath)
    .sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  for (const f of files) {
    if (!MODULE_EXTENSIONS.includes(extname(f))) {
      throw new ConfigError("CONFIG_INVALID_MODULE", `${rel(f)}: matched by images ${JSON.stringify(patterns)}, but is not a module (${MODULE_EXTENSIONS.join(", ")})`, {
        file: f,
        hint: 'narrow the pattern to image modules, for example "./sandboxes/*.ts"',
      });
    }
  }
  if (files.length === 0) {
    throw new ConfigError("CONFIG_NO_IMAGES", `${rel(configPath)}: images ${JSON.stringify(patterns)} match no module in ${root}`, {
      file: configPath,
      hint: "the patterns are relative to the config file's directory; check them, or list no pattern at all",
    });
  }
  log("images %j: %d modules", patterns, files.length);
  return files;
}

async function declareImages(entries: Entry[], env: ConfigEnv, patterns: string[] | undefined): Promise<ProjectImage[]> {
  const byName = new Map<string, Declared>();
  const byExport = new Map<unknown, Declared>();
  const declared: Declared[] = [];
  for (const entry of entries) {
    const stem = basename(entry.module, extname(entry.module));
    const fixedName = entry.key;
    let value = entry.exported;
    const label = () => fixedName ?? (isPlainObject(value) && typeof value.name === "string" ? value.name : stem);
    if (typeof value === "function") {
      const fn = value as (env: ConfigEnv) => unknown;
      value = await callUser(() => fn(env), entry.module, `${entry.rel}: image "${label()}": the definition function`, label());
      if (!isPlainObject(value)) {
        throw new ConfigError("CONFIG_INVALID_MODULE", `${entry.rel}: image "${label()}": the definition function returned ${describe(value)}, not an image definition`, {
          file: entry.module,
          image: label(),
          hint: "return an object: (env) => ({ ref: \"...\", ... })",
        });
      }
    }
    const decl = validate(`${entry.rel}: image "${label()}"`, imageDefinitionSchema, value, entry.module, label());
    let name: string;
    if (fixedName !== undefined) {
      if (decl.name !== undefined && decl.name !== fixedName) {
        throw new ConfigError("CONFIG_NAME_MISMATCH", `${entry.rel}: image "${fixedName}": name ${JSON.stringify(decl.name)} differs from its key in images`, {
          file: entry.module,
          image: fixedName,
          hint: "the key of images is the image's name: drop name, or make it the key",
        });
      }
      name = fixedName;
    } else if (decl.name !== undefined) {
      name = decl.name;
    } else {
      if (!IMAGE_NAME.test(stem)) {
        throw new ConfigError("CONFIG_INVALID_NAME", `${entry.rel}: the file name gives the image name ${JSON.stringify(stem)}, which is not a valid name ([A-Za-z0-9][A-Za-z0-9._-]*, at most 128 characters)`, {
          file: entry.module,
          image: stem,
          hint: 'rename the module, or set name: "..." in its definition',
        });
      }
      name = stem;
    }
    const d: Declared = { ...entry, name, decl };
    const twin = byName.get(name);
    if (twin) {
      throw new ConfigError("CONFIG_DUPLICATE_IMAGE", `image "${name}" is declared twice: in ${twin.rel} and in ${entry.rel}`, {
        file: entry.module,
        image: name,
        hint: 'image names are unique in a project: give one of them another name (name: "..." in its definition, or rename its module)',
      });
    }
    const same = byExport.get(entry.exported);
    if (same) {
      throw new ConfigError("CONFIG_DUPLICATE_IMAGE", `${entry.rel}: image "${name}" is the same definition as image "${same.name}" (${same.rel})`, {
        file: entry.module,
        image: name,
        hint: "each image needs its own defineImage(...); to build on another image, use from",
      });
    }
    byName.set(name, d);
    byExport.set(entry.exported, d);
    declared.push(d);
  }

  return declared.map((d) => {
    const { from, ...fields } = d.decl;
    let parent: string | null = null;
    if (typeof from === "string") {
      parent = from; // an unknown name is the graph layer's to report, with the known ones
    } else if (from !== undefined) {
      const p = byExport.get(from);
      if (!p) {
        throw new ConfigError("CONFIG_UNKNOWN_FROM", `${d.rel}: image "${d.name}": from is a definition that is not one of the project's images, got ${describe(from)}`, {
          file: d.module,
          image: d.name,
          hint: patterns
            ? `import the parent module's default export (import base from "./base"), and make sure that module is matched by images ${JSON.stringify(patterns)}; or give the parent's name`
            : "list the parent definition in images too, or give the parent's name",
        });
      }
      parent = p.name;
    }
    const dir = dirname(d.module);
    const definition: ImageDecl = { ...fields };
    // Host paths are relative to the module that wrote them, not to wherever the CLI runs.
    if (fields.extraFiles) definition.extraFiles = fields.extraFiles.map((f) => ({ ...f, hostPath: resolve(dir, f.hostPath) }));
    if (fields.snapshotsDir !== undefined) definition.snapshotsDir = resolve(dir, fields.snapshotsDir);
    return { name: d.name, module: d.module, definition, from: parent };
  });
}

/** The default export of a loaded module; CONFIG_INVALID_MODULE when there is none or it is not a definition. */
async function importDefault(modules: ModuleSession, file: string, rel: string, kind: "config" | "image"): Promise<unknown> {
  let mod: unknown;
  try {
    mod = await modules.import(file);
  } catch (err) {
    throw new ConfigError("CONFIG_LOAD_FAILED", `${rel}: failed to load: ${errorMessage(err)}`, {
      file,
      cause: err,
      hint: "the error is in this module or in one it imports (the cause has the stack)",
    });
  }
  const hint = kind === "config" ? "end the config file with export default defineConfig({ images: [...] })" : IMAGE_HINT;
  const found = defaultExport(mod);
  if (!found) throw new ConfigError("CONFIG_INVALID_MODULE", `${rel}: has no default export`, { file, hint });
  if (kind === "image" && !isDefinitionLike(found.value)) {
    throw new ConfigError("CONFIG_INVALID_MODULE", `${rel}: the default export must be an image definition (an object, or a function returning one), got ${describe(found.value)}`, {
      file,
      hint,
    });
  }
  return found.value;
}

/**
 * jiti (interopDefault) gives a proxy over the module's exports whose `default` is the default
 * export, or the whole exports object of a CommonJS module (`module.exports = defineImage(...)`).
 * An ES module without a default export has none.
 */
function defaultExport(mod: unknown): { value: unknown } | undefined {
  if (mod === null || (typeof mod !== "object" && typeof mod !== "function")) return { value: mod };
  const own = Object.getOwnPropertyDescriptor(mod, "default");
  if (own) return { value: "value" in own ? own.value : own.get?.call(mod) };
  const esm = Object.getOwnPropertyDescriptor(mod, "__esModule")?.value === true || Object.prototype.toString.call(mod) === "[object Module]";
  return esm ? undefined : { value: (mod as { default: unknown }).default };
}

async function callUser<T>(fn: () => T | Promise<T>, file: string, what: string, image?: string): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw new ConfigError("CONFIG_LOAD_FAILED", `${what} threw: ${errorMessage(err)}`, { file, image, cause: err, hint: "the cause has the stack" });
  }
}

/** parseOptions, with the file and image on the error. */
function validate<S extends z.ZodType>(what: string, schema: S, input: unknown, file: string, image?: string): z.output<S> {
  try {
    return parseOptions(what, schema, input);
  } catch (err) {
    if (err instanceof OptionError) throw new ConfigError(err.code, err.message, { file, image, hint: err.hint, cause: err });
    throw err;
  }
}

function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Cache directories are relative to the config file; registry repositories stay as written. */
function resolveCache(cache: { from?: string | undefined; to?: string | undefined; trust?: "unsigned" | string[] | undefined; signingKey?: string | undefined } | undefined, root: string, file: string, rel: string): LoadedProject["cache"] {
  const out: LoadedProject["cache"] = {};
  if (cache?.trust !== undefined) out.trust = cache.trust;
  if (cache?.signingKey !== undefined) out.signingKey = resolve(root, cache.signingKey);
  for (const k of ["from", "to"] as const) {
    const v = cache?.[k];
    if (v === undefined) continue;
    let loc;
    try {
      loc = parseCacheLocation(v, root);
    } catch (err) {
      const e = err as ConfigError;
      throw new ConfigError("OPTION_INVALID", `${rel}: cache.${k}: ${e.message}`, { file, hint: e.hint, cause: err });
    }
    out[k] = loc.kind === "dir" ? loc.path : v;
  }
  return out;
}

function realpath(p: string): string {
  try {
    return realpathSync.native(p);
  } catch {
    return p;
  }
}
