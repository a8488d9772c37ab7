// Every error class lists its codes (src/errors.ts and beside the classes that live elsewhere);
// the types keep a class from being thrown with another's code, and this test checks the lists
// against the source: every code a class is thrown with is in its list, every listed code is
// thrown somewhere, and every error class is part of the public surface.
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import * as surface from "../../src/index.js";
import * as errors from "../../src/errors.js";
import { CONFIG_ERROR_CODES } from "../../src/config/errors.js";
import { REGISTRY_ERROR_CODES } from "../../src/registry/errors.js";
import { INIT_ERROR_CODES } from "../../src/cli/init.js";
import { SERVER_ERROR_CODES } from "../../src/server/errors.js";

const src = join(import.meta.dirname, "..", "..", "src");
const files = (dir: string): string[] =>
  readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? files(p) : p.endsWith(".ts") ? [p] : [];
  });
const sources = files(src).map((f) => ({ f, text: readFileSync(f, "utf8") }));
/** The setup bootstrap (plain Node, it runs before dist/ exists) reports SetupError codes too. */
const bootstrap = readFileSync(join(src, "..", "scripts", "setup.mjs"), "utf8");

const LISTS: Record<string, readonly string[]> = {
  SetupError: errors.SETUP_ERROR_CODES,
  RefError: errors.REF_ERROR_CODES,
  ImageError: errors.IMAGE_ERROR_CODES,
  EngineError: errors.ENGINE_ERROR_CODES,
  AgentError: errors.AGENT_ERROR_CODES,
  FrameError: errors.AGENT_ERROR_CODES,
  OptionError: errors.OPTION_ERROR_CODES,
  NetworkError: errors.NETWORK_ERROR_CODES,
  PoolError: errors.POOL_ERROR_CODES,
  StoreError: errors.STORE_ERROR_CODES,
  DeadlineError: errors.DEADLINE_ERROR_CODES,
  GuestFileError: errors.GUEST_FILE_ERROR_CODES,
  ExecError: errors.EXEC_ERROR_CODES,
  ForwardError: errors.FORWARD_ERROR_CODES,
  BakeError: errors.BAKE_ERROR_CODES,
  GraphError: errors.GRAPH_ERROR_CODES,
  BuildError: errors.BUILD_ERROR_CODES,
  CacheError: errors.CACHE_ERROR_CODES,
  RuntimeError: errors.RUNTIME_ERROR_CODES,
  ConfigError: CONFIG_ERROR_CODES,
  RegistryError: REGISTRY_ERROR_CODES,
  InitError: INIT_ERROR_CODES,
  ServerError: SERVER_ERROR_CODES,
};

/** Codes made rather than written: the agent's stream error names, guest errnos, and option codes a config error carries over. */
const GENERATED = new Set<string>([
  ...errors.AGENT_STREAM_ERRORS.map((n) => `AGENT_${n}`),
  ...errors.GUEST_FILE_ERROR_CODES.filter((c) => c !== "FILE_TOO_LARGE"),
]);

describe("error codes", () => {
  it("throws every class only with codes of its own list", () => {
    const wrong: string[] = [];
    for (const { f, text } of sources) {
      for (const m of text.matchAll(/new (\w+Error)\(\s*"([A-Z][A-Z0-9_]+)"/g)) {
        const list = LISTS[m[1]!];
        if (!list) wrong.push(`${f}: ${m[1]} is not a listed error class`);
        else if (!list.includes(m[2]!)) wrong.push(`${f}: ${m[1]} thrown with ${m[2]}, which is not one of its codes`);
      }
    }
    expect(wrong).toEqual([]);
  });

  it("throws every listed code somewhere", () => {
    const all = [bootstrap, ...sources.filter(({ f }) => !/src\/errors\.ts$|src\/(config|registry|server)\/errors\.ts$/.test(f)).map(({ text }) => text)].join("\n");
    const unused: string[] = [];
    for (const [cls, list] of Object.entries(LISTS)) {
      if (cls === "ConfigError") continue; // its option codes are carried over from OptionError (checked there)
      for (const code of list) if (!GENERATED.has(code) && !all.includes(`"${code}"`)) unused.push(`${cls}: ${code}`);
    }
    for (const code of CONFIG_ERROR_CODES.filter((c) => c.startsWith("CONFIG_"))) if (!all.includes(`"${code}"`)) unused.push(`ConfigError: ${code}`);
    expect(unused).toEqual([]);
  });

  it("exports every error class a public function can throw, with its code list", () => {
    const classes = Object.keys(LISTS).filter((c) => !["FrameError", "InitError"].includes(c));
    for (const c of classes) expect(typeof (surface as Record<string, unknown>)[c], c).toBe("function");
    for (const c of classes) expect(new ((surface as Record<string, unknown>)[c] as new (code: string, m: string, ...rest: unknown[]) => Error)("X", "m"), c).toBeInstanceOf(surface.SupermachineError);
    expect(surface.NetworkError.prototype).toBeInstanceOf(surface.OptionError);
  });
});
