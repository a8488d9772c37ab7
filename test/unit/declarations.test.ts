// The published declarations (.d.ts) are the package's contract: what they name, users can
// depend on. This compiles them afresh (never a stale dist/) and walks everything reachable from
// the two entry points, `supermachine` and `supermachine/config`: no engine, store, agent or
// bake module may be reachable, no internal type named, and no @internal member shipped.
import { execFile } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const root = join(import.meta.dirname, "..", "..");
const INTERNAL_FOLDERS = /^src\/(engine|store|agent|bake)\//;
const INTERNAL_TYPES = ["MicroVm", "PendingVm", "VmSpec", "QmpClient", "AgentClient", "ExecStream", "TcpStream", "LoadedSnapshot", "SnapshotMeta", "LockWait", "BlobStore", "BuiltNode", "GuestEgress"];

let out: string;
let reachable = new Map<string, string>();

/** Files reachable from the entry points by relative imports (static and `import("...")` types). */
function walk(entries: string[]): Map<string, string> {
  const reachable = new Map<string, string>();
  const stack = [...entries];
  while (stack.length) {
    const f = stack.pop()!;
    if (reachable.has(f) || !existsSync(f)) continue;
    const text = readFileSync(f, "utf8");
    reachable.set(f, text);
    for (const m of text.matchAll(/(?:from\s+|import\()\s*"(\.[^"]+)"/g)) stack.push(join(dirname(f), m[1]!.replace(/\.js$/, ".d.ts")));
  }
  return reachable;
}

beforeAll(async () => {
  out = mkdtempSync(join(tmpdir(), "sm-dts-"));
  await promisify(execFile)(process.execPath, [join(root, "node_modules/typescript/bin/tsc"), "-p", join(root, "tsconfig.json"), "--outDir", out, "--emitDeclarationOnly"], { cwd: root });
  reachable = walk([join(out, "src/index.d.ts"), join(out, "src/config/index.d.ts")]);
}, 120_000);

afterAll(() => rmSync(out, { recursive: true, force: true }));

describe("the published declarations", () => {
  it("reach no engine, store, agent or bake module", () => {
    const files = [...reachable.keys()].map((f) => relative(out, f));
    expect(files).toContain("src/index.d.ts");
    expect(files.length).toBeGreaterThan(10);
    expect(files.filter((f) => INTERNAL_FOLDERS.test(f))).toEqual([]);
  });

  it("name no internal type and ship no @internal member", () => {
    const found: string[] = [];
    for (const [f, text] of reachable) {
      const code = text.replace(/\/\*[\s\S]*?\*\/|\/\/.*$/gm, "");
      for (const t of INTERNAL_TYPES) if (new RegExp(`\\b${t}\\b`).test(code)) found.push(`${relative(out, f)}: ${t}`);
      if (text.includes("@internal")) found.push(`${relative(out, f)}: @internal`);
    }
    expect(found).toEqual([]);
  });

  it("give the public classes no public constructor (users get them from the API)", () => {
    const all = [...reachable.values()].join("\n");
    for (const cls of ["Image", "Pool", "Vm", "ExecChild", "TcpForwarder"]) {
      const body = new RegExp(`export declare class ${cls}\\b[^{]*\\{([\\s\\S]*?)\\n\\}`).exec(all)?.[1];
      expect(body, cls).toBeDefined();
      expect(body, cls).toMatch(/\n {4}private constructor\(\);/);
    }
  });

  it("would catch a leak through a type import two files away", () => {
    const dir = mkdtempSync(join(tmpdir(), "sm-dts-leak-"));
    try {
      mkdirSync(join(dir, "src/runtime"), { recursive: true });
      mkdirSync(join(dir, "src/engine"), { recursive: true });
      writeFileSync(join(dir, "src/index.d.ts"), 'export { Vm } from "./runtime/vm.js";\n');
      writeFileSync(join(dir, "src/runtime/vm.d.ts"), 'export declare class Vm { get machine(): import("../engine/qemu.js").MicroVm; }\n');
      writeFileSync(join(dir, "src/engine/qemu.d.ts"), "export declare class MicroVm {}\n");
      const files = [...walk([join(dir, "src/index.d.ts")]).keys()].map((f) => relative(dir, f));
      expect(files.filter((f) => INTERNAL_FOLDERS.test(f))).toEqual(["src/engine/qemu.d.ts"]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
