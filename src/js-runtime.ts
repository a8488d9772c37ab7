/**
 * The JavaScript runtime the library runs on (Node, Bun or Deno) and whether it can: the oldest
 * release of each that has every API the library uses, and under Deno the permissions it needs.
 * src/js-runtime-check.ts runs the check when the package is imported, so that a runtime that
 * lacks something fails at once with a RuntimeError naming the runtime and what is missing,
 * never later with a hang or an error from deep inside. docs/runtimes.md has the table.
 *
 * This module is evaluated before any other of the package: it imports nothing but the error
 * classes and reads no environment variable (a Deno without --allow-env would throw).
 */
import { RuntimeError } from "./errors.js";

export type JsRuntimeName = "node" | "bun" | "deno";

export interface JsRuntime {
  name: JsRuntimeName;
  /** The runtime's own version: "20.20.2", "1.4.5", "2.9.6". */
  version: string;
  /** The Node.js version whose API the runtime provides (Bun and Deno report one). */
  nodeApi: string;
}

export interface RuntimeMinimum {
  /** The oldest release that runs the library (checked by hand: docs/runtimes.md). */
  version: string;
  /** What the releases before it lack, for the error message. */
  lacks: string;
}

/** The oldest release of each runtime that runs supermachine, and what older ones lack. */
export const RUNTIME_MINIMUMS: Readonly<Record<JsRuntimeName, RuntimeMinimum>> = {
  node: { version: "20.0.0", lacks: "the APIs of the package's engines range (node >=20)" },
  bun: { version: "1.2.0", lacks: "statfs in node:fs/promises (Bun 1.1) and the module loader jiti needs for config files (Bun 1.0)" },
  deno: {
    version: "2.7.14",
    lacks: "passing file descriptors to a child process (node:child_process stdio entries that are numbers), which is how QEMU gets its files",
  },
};

/** The permissions supermachine needs under Deno, as `deno run` flags; `-A` grants them all. */
export const DENO_PERMISSIONS = ["env", "read", "write", "run", "net", "sys", "ffi"] as const;

export const RUNTIME_LABELS: Readonly<Record<JsRuntimeName, string>> = { node: "Node", bun: "Bun", deno: "Deno" };

interface DenoGlobal {
  version: { deno: string };
  permissions: { querySync(d: { name: string }): { state: string } };
  statSync(path: string): unknown;
}

const denoGlobal = (): DenoGlobal | undefined => (globalThis as { Deno?: DenoGlobal }).Deno;

/** The runtime this code runs on. */
export function currentJsRuntime(): JsRuntime {
  const nodeApi = process.versions.node;
  const deno = denoGlobal();
  if (deno?.version?.deno) return { name: "deno", version: deno.version.deno, nodeApi };
  const bun = (process.versions as { bun?: string }).bun;
  if (bun) return { name: "bun", version: bun, nodeApi };
  return { name: "node", version: nodeApi, nodeApi };
}

/** "Bun 1.4.5". */
export const describeJsRuntime = (rt: JsRuntime): string => `${RUNTIME_LABELS[rt.name]} ${rt.version}`;

/** Compares dotted versions numerically ("2.7.14" > "2.7.9"); a pre-release suffix is ignored. */
export function compareVersions(a: string, b: string): number {
  const parts = (v: string) => v.replace(/^v/, "").split(/[-+]/)[0]!.split(".").map((p) => Number.parseInt(p, 10) || 0);
  const pa = parts(a);
  const pb = parts(b);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0);
    if (d !== 0) return Math.sign(d);
  }
  return 0;
}

export interface RuntimeFacts {
  runtime: JsRuntime;
  /** Under Deno: the `--allow-*` flags of DENO_PERMISSIONS not granted. */
  missingPermissions?: readonly string[];
  /** Under Deno: whether device files (/dev/kvm) are readable, which only `-A` allows. */
  devicesReadable?: boolean;
}

/** Why the runtime described by `f` cannot run supermachine, or undefined when it can. */
export function runtimeProblem(f: RuntimeFacts): RuntimeError | undefined {
  const rt = f.runtime;
  const min = RUNTIME_MINIMUMS[rt.name];
  const label = RUNTIME_LABELS[rt.name];
  if (compareVersions(rt.version, min.version) < 0) {
    const upgrade =
      rt.name === "node" ? "install Node.js 20 or later" : rt.name === "bun" ? "run `bun upgrade`" : "run `deno upgrade`";
    return new RuntimeError("RUNTIME_UNSUPPORTED", `supermachine needs ${label} ${min.version} or later; this is ${describeJsRuntime(rt)}, which lacks ${min.lacks}`, {
      hint: `${upgrade} (or run supermachine with Node.js 20 or later); docs/runtimes.md lists what each runtime supports`,
    });
  }
  if (rt.name === "deno") {
    const missing = f.missingPermissions ?? [];
    if (missing.length > 0 || f.devicesReadable === false) {
      const what = missing.length > 0 ? `it lacks ${missing.join(", ")}` : "device files such as /dev/kvm are readable only with --allow-all";
      return new RuntimeError(
        "RUNTIME_PERMISSIONS",
        `supermachine under ${describeJsRuntime(rt)} needs every permission (it starts QEMU, reads /dev/kvm, loads a native addon and listens on sockets): ${what}`,
        { hint: "run it with `deno run -A` (starting processes with --allow-run already amounts to every permission)" },
      );
    }
  }
  return undefined;
}

/** Reads the facts of the runtime this code runs on (under Deno, its permissions) and checks them. */
export function checkJsRuntime(): RuntimeError | undefined {
  const runtime = currentJsRuntime();
  const facts: RuntimeFacts = { runtime };
  const deno = denoGlobal();
  if (runtime.name === "deno" && deno && compareVersions(runtime.version, RUNTIME_MINIMUMS.deno.version) >= 0) {
    facts.missingPermissions = DENO_PERMISSIONS.filter((name) => deno.permissions.querySync({ name }).state !== "granted").map((n) => `--allow-${n}`);
    if (facts.missingPermissions.length === 0) facts.devicesReadable = denoDevicesReadable(deno);
  }
  return runtimeProblem(facts);
}

/** Deno reads device files only with --allow-all, whatever --allow-read says. */
function denoDevicesReadable(deno: DenoGlobal): boolean {
  try {
    deno.statSync("/dev/kvm"); // the permission is checked whether or not the file exists
    return true;
  } catch (e) {
    return (e as Error).name !== "NotCapable" && (e as Error).name !== "PermissionDenied";
  }
}
