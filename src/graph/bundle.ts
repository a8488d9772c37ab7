/**
 * The code part of an image's key: its module bundled with esbuild, minified, so that what the
 * module runs (its warmup, the helpers it imports) decides the key, and comments, formatting,
 * paths and mtimes do not. Packages installed from a registry are not bundled: each is pinned
 * by its installed version. Workspace packages (symlinked, their sources outside node_modules)
 * are bundled like local files, so an edit to a shared helper counts.
 */
import { createHash } from "node:crypto";
import { readFileSync, realpathSync } from "node:fs";
import { builtinModules } from "node:module";
import { dirname, join, relative, sep } from "node:path";
import * as esbuild from "esbuild";
import { GraphError } from "../errors.js";

export interface ModuleDigest {
  /** sha256 of the minified bundle: the module's part of the key. */
  sha256: string;
  /** Installed packages the module imports (not bundled), by name: their versions. */
  packages: Record<string, string>;
  /** Every local file in the bundle (paths relative to the project root) with its sha256. */
  files: Record<string, string>;
}

const OWN_PACKAGE = "supermachine";
const builtins = new Set(builtinModules);

/** The package name of a bare import (`@scope/pkg/sub` → `@scope/pkg`). */
function packageName(spec: string): string {
  const parts = spec.split("/");
  return spec.startsWith("@") ? parts.slice(0, 2).join("/") : parts[0]!;
}

/** The version in the package.json of `name` that holds `file`. */
function installedVersion(file: string, name: string): string {
  for (let dir = dirname(file); ; dir = dirname(dir)) {
    try {
      const pj = JSON.parse(readFileSync(join(dir, "package.json"), "utf8")) as { name?: string; version?: string };
      if (pj.name === name) return pj.version ?? "0.0.0";
    } catch {
      /* no package.json here */
    }
    if (dirname(dir) === dir) return "unknown";
  }
}

let ownVersion: string | undefined;
function supermachineVersion(): string {
  if (ownVersion === undefined) {
    ownVersion = "unknown";
    for (let dir = dirname(new URL(import.meta.url).pathname); dirname(dir) !== dir; dir = dirname(dir)) {
      try {
        const pj = JSON.parse(readFileSync(join(dir, "package.json"), "utf8")) as { name?: string; version?: string };
        if (pj.name === OWN_PACKAGE) {
          ownVersion = pj.version ?? "unknown";
          break;
        }
      } catch {
        /* keep looking */
      }
    }
  }
  return ownVersion;
}

/**
 * Bundles each module (absolute paths) and digests it. One esbuild run for all of them.
 * `root` is the project root: file paths in the result are relative to it.
 */
export async function digestModules(modules: string[], root: string): Promise<Map<string, ModuleDigest>> {
  const out = new Map<string, ModuleDigest>();
  const unique = [...new Set(modules)];
  if (unique.length === 0) return out;
  // Packages each importer pulled in, filled by the plugin (keyed by the importing file).
  const packagesOf = new Map<string, Record<string, string>>();
  const note = (importer: string, name: string, version: string) => {
    const m = packagesOf.get(importer) ?? {};
    m[name] = version;
    packagesOf.set(importer, m);
  };
  const externals: esbuild.Plugin = {
    name: "supermachine-externals",
    setup(build) {
      build.onResolve({ filter: /^[^./]/ }, async (args) => {
        if (args.pluginData === "inner") return undefined;
        const spec = args.path;
        if (spec.startsWith("node:") || builtins.has(spec) || builtins.has(packageName(spec))) {
          return { path: spec, external: true };
        }
        const name = packageName(spec);
        if (name === OWN_PACKAGE) {
          note(args.importer, name, supermachineVersion());
          return { path: spec, external: true };
        }
        const r = await build.resolve(spec, { kind: args.kind, resolveDir: args.resolveDir, importer: args.importer, pluginData: "inner" });
        if (r.errors.length || !r.path) return undefined; // esbuild reports the unresolved import
        let real = r.path;
        try {
          real = realpathSync(r.path);
        } catch {
          /* keep the path */
        }
        if (real.split(sep).includes("node_modules")) {
          note(args.importer, name, installedVersion(real, name));
          return { path: spec, external: true };
        }
        // A workspace package: its sources count like the project's own.
        return { path: real };
      });
    },
  };
  let result: esbuild.BuildResult<{ write: false; metafile: true }>;
  try {
    result = await esbuild.build({
      entryPoints: unique,
      absWorkingDir: root,
      bundle: true,
      write: false,
      metafile: true,
      minify: true,
      legalComments: "none",
      charset: "utf8",
      format: "esm",
      platform: "node",
      target: "node20",
      outdir: join(root, ".supermachine-bundle"),
      entryNames: "[dir]/[name]-[hash]",
      logLevel: "silent",
      plugins: [externals],
    });
  } catch (err) {
    const e = err as { errors?: esbuild.Message[] };
    const first = e.errors?.[0];
    const at = first?.location ? `${first.location.file}:${first.location.line}: ` : "";
    throw new GraphError("GRAPH_BUNDLE_FAILED", `cannot bundle the image modules: ${at}${first?.text ?? (err as Error).message}`, {
      hint: "the module or a file it imports does not compile or import cleanly",
      cause: err,
    });
  }
  const byOutput = new Map(result.outputFiles.map((f) => [relative(root, f.path), f]));
  const hashFile = (rel: string) => createHash("sha256").update(readFileSync(join(root, rel))).digest("hex");
  for (const [outPath, meta] of Object.entries(result.metafile.outputs)) {
    if (!meta.entryPoint) continue;
    const entry = join(root, meta.entryPoint);
    const file = byOutput.get(outPath) ?? byOutput.get(relative(root, join(root, outPath)));
    if (!file) continue;
    const files: Record<string, string> = {};
    const packages: Record<string, string> = {};
    for (const input of Object.keys(meta.inputs)) {
      files[input] = hashFile(input);
      Object.assign(packages, packagesOf.get(join(root, input)));
    }
    // Imports of the entry itself are noted under its path too.
    Object.assign(packages, packagesOf.get(entry));
    out.set(entry, {
      sha256: createHash("sha256").update(file.contents).digest("hex"),
      packages: Object.fromEntries(Object.entries(packages).sort(([a], [b]) => a.localeCompare(b))),
      files: Object.fromEntries(Object.entries(files).sort(([a], [b]) => a.localeCompare(b))),
    });
  }
  for (const m of unique) {
    if (!out.has(m)) throw new GraphError("GRAPH_BUNDLE_FAILED", `esbuild produced no bundle for ${relative(root, m)}`);
  }
  return out;
}
