/**
 * Loading config modules with jiti: TypeScript, ESM or CJS, top-level await, without a build
 * step and without the project depending on supermachine (`supermachine/config` is aliased to this
 * package's own modules).
 *
 * One session per load, with its own module cache: within a load a module is evaluated once, so
 * an image definition imported by another module is the very object the loader saw (that is how
 * `from: python` is mapped back to the name "python"); across loads nothing is reused, so a second
 * load sees edited files. jiti's file cache keeps transpiled code keyed by the source's hash, so
 * it never serves stale code and stays on.
 *
 * Two things Node would otherwise cache for the life of the process: its ESM loader (what jiti
 * imports natively: .mjs, .cjs, ESM .js), which cannot be purged, and its require cache. A project
 * file is therefore never handed to Node's ESM loader (the import hook below refuses it and jiti
 * transpiles it instead), and what a load put in the require cache is removed when it ends.
 * Packages in node_modules are imported natively and kept.
 */
import { realpathSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, extname, isAbsolute, join, sep } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { createJiti, type Jiti, type JitiOptions, type TransformOptions, type TransformResult } from "jiti";
import { logger } from "../debug.js";
import { homePaths } from "../paths.js";

const log = logger("config");
const require = createRequire(import.meta.url);

const self = fileURLToPath(import.meta.url);
const configDir = dirname(self);
/** This package's own modules: src/ under vitest, dist/src/ when compiled. */
const ownDir = dirname(configDir);
/** ".ts" when running from src/ (vitest), ".js" from dist/. */
const ownExt = extname(self);

/** What project modules import supermachine as: this package's own entries, wherever they are. */
export const SELF_ALIASES: Readonly<Record<string, string>> = {
  "supermachine/config": join(configDir, `index${ownExt}`),
  supermachine: join(ownDir, `index${ownExt}`),
};

function realpath(p: string): string {
  try {
    return realpathSync.native(p);
  } catch {
    return p;
  }
}

const inNodeModules = (p: string) => p.split(sep).includes("node_modules");
const inOwnDir = (p: string) => p.startsWith(ownDir + sep);

/** A file of the project (not a package, not supermachine itself): its edits must be seen. */
function isProjectFile(p: string): boolean {
  const real = realpath(p);
  return !inNodeModules(real) && !inOwnDir(real);
}

// ---- jiti with a per-load module cache ---------------------------------------------------------

/** The context jiti's own ESM entry (jiti/lib/jiti.mjs) passes to the factory it wraps. */
interface JitiContext {
  onError: (err: unknown) => never;
  nativeImport: (id: string | URL) => Promise<unknown>;
  createRequire: typeof createRequire;
  /** Module cache shared by every import of this instance and of the modules it loads. */
  parentCache?: Record<string, unknown>;
}
type JitiFactory = (id: string, opts: JitiOptions, ctx: JitiContext) => Jiti;

/**
 * jiti's public createJiti keeps modules either in Node's global require cache (moduleCache) or in
 * a cache per top-level import (so a module imported twice is evaluated twice, breaking identity).
 * Its factory takes the shared per-instance cache we need, and the native-import hook; it is what
 * jiti's ESM entry wraps. Without it (another jiti layout), the public API is used: see
 * openModules.
 */
let factory: { create: JitiFactory; transform: (o: TransformOptions) => TransformResult } | null | undefined;
function jitiFactory() {
  if (factory === undefined) {
    try {
      const dist = join(dirname(require.resolve("jiti/package.json")), "dist");
      const create: unknown = require(join(dist, "jiti.cjs"));
      let babel: ((o: TransformOptions) => TransformResult) | undefined;
      factory =
        typeof create === "function"
          ? { create: create as JitiFactory, transform: (o) => (babel ??= require(join(dist, "babel.cjs")) as (o: TransformOptions) => TransformResult)(o) }
          : null;
    } catch (err) {
      log("jiti's factory is not available (%s): module cache through Node's require cache", (err as Error).message);
      factory = null;
    }
  }
  return factory;
}

/** Node's loader for packages; project files are refused so that jiti transpiles them (see top). */
function nativeImport(id: string | URL): Promise<unknown> {
  const file = id instanceof URL || id.startsWith("file:") ? fileURLToPath(id) : isAbsolute(id) ? id : undefined;
  if (file !== undefined && /\.[cm]?js$/.test(file) && isProjectFile(file)) {
    return Promise.reject(new Error(`${file}: a project module, transpiled rather than cached by Node's ESM loader`));
  }
  return import(file !== undefined ? pathToFileURL(file).href : String(id));
}

function onError(err: unknown): never {
  throw err;
}

export interface ModuleSession {
  /** The module's exports, as jiti gives them (with interopDefault). */
  import(file: string): Promise<unknown>;
  /**
   * Ends the session: removes what it put in Node's require cache and returns every project file
   * it loaded (absolute real paths, sorted; nothing in node_modules or of supermachine itself).
   */
  close(): string[];
}

/** `shared: false` forces jiti's public API (what happens when its factory is not found). */
export function openModules(configPath: string, { shared = true }: { shared?: boolean } = {}): ModuleSession {
  const requireCache = require.cache;
  const before = new Set(Object.keys(requireCache));
  const parentCache: Record<string, unknown> = Object.create(null) as Record<string, unknown>;
  // jiti's transpile cache (keyed by each source's hash, so never stale) lives with supermachine's
  // other caches, not in the system temp directory.
  const options: JitiOptions = { interopDefault: true, alias: { ...SELF_ALIASES }, fsCache: join(homePaths().home, "cache", "jiti") };
  const f = shared ? jitiFactory() : null;
  const jiti = f
    ? f.create(configPath, { ...options, moduleCache: false, transform: f.transform }, { onError, nativeImport, createRequire, parentCache })
    : // Identity within the load through Node's require cache, purged at close.
      createJiti(configPath, { ...options, moduleCache: true });
  log("loading %s (module cache: %s)", configPath, f ? "per load" : "require cache, purged after the load");
  return {
    import: (file) => jiti.import(file),
    close() {
      const loaded = new Set(Object.keys(parentCache));
      for (const k of Object.keys(requireCache)) {
        if (before.has(k) || inNodeModules(k)) continue;
        delete requireCache[k];
        loaded.add(k);
      }
      const files = new Set<string>();
      for (const p of loaded) {
        const real = realpath(p);
        if (isAbsolute(real) && !inNodeModules(real) && !inOwnDir(real)) files.add(real);
      }
      return [...files].sort();
    },
  };
}
