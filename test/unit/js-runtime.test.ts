// The runtime check the package runs when it is imported (src/js-runtime.ts): what it refuses
// and how it says so. The compatibility tier (test/compat) runs the real runtimes.
import { describe, expect, it } from "vitest";
import { compareVersions, currentJsRuntime, RUNTIME_MINIMUMS, runtimeProblem, type JsRuntime } from "../../src/js-runtime.js";

const rt = (name: JsRuntime["name"], version: string): JsRuntime => ({ name, version, nodeApi: "24.0.0" });

describe("js runtime check", () => {
  it("compares versions by number, not as text", () => {
    expect(compareVersions("2.7.14", "2.7.9")).toBe(1);
    expect(compareVersions("2.7.9", "2.7.14")).toBe(-1);
    expect(compareVersions("1.2", "1.2.0")).toBe(0);
    expect(compareVersions("v20.1.0", "20.0.0")).toBe(1);
    expect(compareVersions("1.3.0-canary.5", "1.3.0")).toBe(0);
  });

  it("detects Node here, with its own version as the Node API", () => {
    expect(currentJsRuntime()).toEqual({ name: "node", version: process.versions.node, nodeApi: process.versions.node });
  });

  it("accepts each runtime from its minimum on and refuses the release before, naming runtime, version and what it lacks", () => {
    for (const name of ["node", "bun", "deno"] as const) {
      const min = RUNTIME_MINIMUMS[name].version;
      expect(runtimeProblem({ runtime: rt(name, min), missingPermissions: [], devicesReadable: true }), `${name} ${min}`).toBeUndefined();
    }
    const deno = runtimeProblem({ runtime: rt("deno", "2.6.8") });
    expect(deno?.code).toBe("RUNTIME_UNSUPPORTED");
    expect(deno?.message).toBe(`supermachine needs Deno 2.7.14 or later; this is Deno 2.6.8, which lacks ${RUNTIME_MINIMUMS.deno.lacks}`);
    expect(deno?.hint).toContain("deno upgrade");
    const bun = runtimeProblem({ runtime: rt("bun", "1.1.45") });
    expect(bun?.message).toMatch(/^supermachine needs Bun 1\.2\.0 or later; this is Bun 1\.1\.45, which lacks statfs/);
    expect(bun?.hint).toContain("bun upgrade");
    expect(runtimeProblem({ runtime: rt("node", "18.20.0") })?.hint).toContain("Node.js 20");
  });

  it("refuses a Deno without every permission, listing the flags it lacks and suggesting -A", () => {
    const missing = runtimeProblem({ runtime: rt("deno", "2.9.6"), missingPermissions: ["--allow-run", "--allow-ffi"] });
    expect(missing?.code).toBe("RUNTIME_PERMISSIONS");
    expect(missing?.message).toContain("Deno 2.9.6 needs every permission");
    expect(missing?.message).toContain("it lacks --allow-run, --allow-ffi");
    expect(missing?.hint).toContain("deno run -A");
    const devices = runtimeProblem({ runtime: rt("deno", "2.9.6"), missingPermissions: [], devicesReadable: false });
    expect(devices?.message).toContain("/dev/kvm are readable only with --allow-all");
    // Permissions are Deno's alone.
    expect(runtimeProblem({ runtime: rt("bun", "1.4.5"), missingPermissions: ["--allow-run"] })).toBeUndefined();
  });
});
