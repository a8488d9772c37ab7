// The option schemas (src/schema): every bad input is refused with a stable code, a message naming
// the call, the option and the value, and a hint, before anything reaches a guest.
import { describe, expect, it } from "vitest";
import { buildSchema, poolSchema } from "../../src/schema/options.js";
import { mergeLimits } from "../../src/schema/fields.js";
import { execSchema, spawnSchema, readFileSchema } from "../../src/schema/calls.js";
import { imageDefinitionSchema } from "../../src/schema/config.js";
import { execDefaults } from "../../src/session/env.js";
import { buildImageGraph } from "../../src/graph/graph.js";
import { parseOptions } from "../../src/schema/parse.js";
import { OptionError } from "../../src/errors.js";

function refused(fn: () => unknown): OptionError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(OptionError);
    return e as OptionError;
  }
  throw new Error("expected an OptionError");
}

const exec = (o: unknown) => parseOptions("vm.exec", execSchema, o);

describe("exec options", () => {
  it("fills the seed's defaults", () => {
    const o = exec({ argv: ["echo", "hi"] });
    expect(o).toMatchObject({ argv: ["echo", "hi"], timeoutMs: 60_000, env: {}, tty: false, files: [] });
  });

  it("refuses an unknown option with the accepted ones in the hint", () => {
    const e = refused(() => exec({ argv: ["x"], timeout: 5 }));
    expect(e.code).toBe("OPTION_UNKNOWN");
    expect(e.message).toContain('"timeout"');
    expect(e.hint).toContain('"timeoutMs"');
    expect(e.hint).toContain('"winsize"');
  });

  it("refuses an empty argv, a non-string entry, an empty program and NUL bytes", () => {
    expect(refused(() => exec({ argv: [] })).message).toMatch(/vm\.exec: argv must not be empty/);
    const e = refused(() => exec({ argv: ["echo", 3] }));
    expect(e.code).toBe("OPTION_INVALID");
    expect(e.message).toBe("vm.exec: argv[1] must be a string, got 3");
    expect(refused(() => exec({ argv: [""] })).message).toMatch(/argv\[0\] is empty/);
    expect(refused(() => exec({ argv: ["a\0b"] })).message).toMatch(/argv\[0\] must not contain a NUL byte/);
    expect(refused(() => exec({})).code).toBe("OPTION_MISSING");
    expect(refused(() => exec("echo")).message).toMatch(/options must be an object, got "echo"/);
  });

  it("refuses relative and non-normalised guest paths in stageFiles", () => {
    for (const bad of ["tmp/x", "/tmp/../etc/x", "/tmp//x", "/tmp/x/", "/tmp/./x", "/"]) {
      const e = refused(() => exec({ argv: ["true"], stageFiles: { [bad]: Buffer.from("x") } }));
      expect(e.message).toContain(JSON.stringify(bad));
      expect(e.message).toContain("absolute, normalised guest path");
    }
    const e = refused(() => exec({ argv: ["true"], stageFilesMode: [{ path: "rel", bytes: Buffer.alloc(1), mode: 0o755 }] }));
    expect(e.message).toContain("stageFilesMode[0].path");
    const m = refused(() => exec({ argv: ["true"], stageFilesMode: [{ path: "/x", bytes: Buffer.alloc(1), mode: 0o10000 }] }));
    expect(m.message).toContain("stageFilesMode[0].mode must be an integer from 0 to 4095");
  });

  it("refuses staged files over the 4 MiB cap with their own code", () => {
    const e = refused(() => exec({ argv: ["true"], stageFiles: { "/big": Buffer.alloc(4 * 1024 * 1024 + 1) } }));
    expect(e.code).toBe("OPTION_FILE_TOO_LARGE");
    expect(e.message).toContain("Buffer(4194305)");
  });

  it("refuses winsize without tty, and bad sizes", () => {
    const e = refused(() => exec({ argv: ["true"], winsize: { cols: 80, rows: 24 } }));
    expect(e.message).toBe('vm.exec: winsize needs tty: true (a size is only for a terminal), got {"cols":80,"rows":24}');
    expect(refused(() => exec({ argv: ["true"], tty: true, winsize: { cols: 0, rows: 24 } })).message).toContain("winsize.cols");
    expect(exec({ argv: ["true"], tty: true, winsize: { cols: 100, rows: 30 } }).winsize).toEqual({ cols: 100, rows: 30 });
  });

  it("checks chain, env, cwd and signal", () => {
    expect(refused(() => exec({ argv: ["true"], chain: [] })).message).toContain("chain must not be empty");
    expect(refused(() => exec({ argv: ["true"], env: { "A=B": "x" } })).message).toContain("not a valid environment variable name");
    expect(refused(() => exec({ argv: ["true"], env: { A: 1 } })).message).toContain("env.A must be a string");
    expect(refused(() => exec({ argv: ["true"], cwd: "tmp" })).message).toContain("cwd must be an absolute");
    expect(refused(() => exec({ argv: ["true"], signal: {} })).message).toContain("signal must be an AbortSignal");
    expect(exec({ argv: ["true"], cwd: "/" }).cwd).toBe("/");
  });

  it("refuses every guest path a user gives unless it is absolute and normalised, naming the value", () => {
    // Each place a guest path comes from: exec and spawn cwd, staged files, extraFiles (in
    // Image.build and in a config file's image). vm.readFile/writeFile: test/vm/files.test.ts.
    const places: [string, (p: string) => unknown][] = [
      ["cwd", (p) => exec({ argv: ["true"], cwd: p })],
      ["cwd", (p) => parseOptions("vm.spawn", spawnSchema, { argv: ["true"], cwd: p })],
      ["stageFiles", (p) => exec({ argv: ["true"], stageFiles: { [p]: "x" } })],
      ["stageFilesMode[0].path", (p) => exec({ argv: ["true"], stageFilesMode: [{ path: p, bytes: "x", mode: 0o755 }] })],
      ["extraFiles[0].guestPath", (p) => parseOptions("Image.build", buildSchema, { ref: "x", extraFiles: [{ hostPath: "./a", guestPath: p }] })],
      ["extraFiles[0].guestPath", (p) => parseOptions("image", imageDefinitionSchema, { ref: "x", extraFiles: [{ hostPath: "./a", guestPath: p }] })],
    ];
    for (const [where, call] of places) {
      for (const bad of ["etc/x", "./x", "/tmp/../etc/x", "/tmp/./x", "/tmp//x", "/tmp/x/", "/..", ""]) {
        const e = refused(() => call(bad));
        expect(e.code, `${where} ${bad}`).toBe("OPTION_INVALID");
        expect(e.message).toContain(where);
        expect(e.message).toContain(`got ${JSON.stringify(bad)}`);
      }
      expect(() => call("/srv/app")).not.toThrow();
    }
    expect(exec({ argv: ["true"], cwd: "/" }).cwd).toBe("/");
  });

  it("resolves an image's relative or unnormalised WorkingDir from /", () => {
    const wd = (workingDir: string) => execDefaults({ env: [], workingDir, exposedPorts: [], labels: {} }, {}).workingDir;
    expect(wd("app")).toBe("/app");
    expect(wd("/srv/../etc/./x/")).toBe("/etc/x");
    expect(wd("/srv/app")).toBe("/srv/app");
    expect(wd("")).toBeUndefined();
  });

  it("checks limits and detach", () => {
    expect(exec({ argv: ["x"], limits: { processes: 10, memoryMib: 64 }, detach: true })).toMatchObject({ limits: { processes: 10, memoryMib: 64 }, detach: true });
    expect(exec({ argv: ["x"] })).toMatchObject({ detach: false });
    expect(exec({ argv: ["x"] }).limits).toBeUndefined();
    expect(refused(() => exec({ argv: ["x"], limits: { processes: 0 } })).message).toMatch(/limits\.processes must be an integer from 1 to 4194304/);
    expect(refused(() => exec({ argv: ["x"], limits: { memoryMib: 0.5 } })).message).toMatch(/limits\.memoryMib must be an integer from 1/);
    const unk = refused(() => exec({ argv: ["x"], limits: { memory: 64 } }));
    expect(unk.code).toBe("OPTION_UNKNOWN");
    expect(unk.hint).toBe('accepted options of limits: "processes", "memoryMib"');
    expect(refused(() => exec({ argv: ["x"], limits: 5 })).message).toMatch(/limits must be an object/);
    expect(refused(() => exec({ argv: ["x"], detach: "yes" })).message).toMatch(/detach must be a boolean/);
  });

  it("gives spawn no default timeout", () => {
    expect(parseOptions("vm.spawn", spawnSchema, { argv: ["cat"] }).timeoutMs).toBeUndefined();
  });
});

describe("build and pool options", () => {
  it("fills defaults and refuses bad values", () => {
    const b = parseOptions("Image.build", buildSchema, { ref: " builtin:busybox " });
    const node = buildImageGraph([{ name: "a", module: null, from: null, definition: b }]).spec("a");
    expect(node).toMatchObject({ ref: "builtin:busybox", memoryMib: 256, vcpus: 1, pullPolicy: "missing", guestPort: 80, warmupTag: "default", extraFiles: [] });
    const p = refused(() => parseOptions("Image.build", buildSchema, { ref: "x", pullPolicy: "sometimes" }));
    expect(p.hint).toBe('accepted values: "always", "missing", "never"');
    expect(refused(() => parseOptions("Image.build", buildSchema, { ref: "x", guestPort: 70000 })).message).toContain("guestPort must be an integer from 1 to 65535");
    expect(refused(() => parseOptions("Image.build", buildSchema, { ref: "x", warmup: "python3 -c 1" })).message).toContain("warmup must be a function");
    const ef = refused(() => parseOptions("Image.build", buildSchema, { ref: "x", extraFiles: [{ hostPath: "./a", guestPath: "etc/a" }] }));
    expect(ef.message).toContain("extraFiles[0].guestPath");
    const dup = refused(() =>
      parseOptions("Image.build", buildSchema, { ref: "x", extraFiles: [{ hostPath: "./a", guestPath: "/a" }, { hostPath: "./b", guestPath: "/a" }] }),
    );
    expect(dup.message).toContain("extraFiles[1].guestPath appears twice");
    const unk = refused(() => parseOptions("Image.build", buildSchema, { ref: "x", extraFiles: [{ hostPath: "./a", guestPath: "/a", owner: 0 }] }));
    expect(unk.code).toBe("OPTION_UNKNOWN");
    expect(unk.hint).toBe('accepted options of extraFiles[0]: "hostPath", "guestPath", "mode"');
  });

  it("execLimits on images and pools, merged field by field (call over pool over image)", () => {
    expect(parseOptions("Image.build", buildSchema, { ref: "x", execLimits: { processes: 5 } }).execLimits).toEqual({ processes: 5 });
    expect(parseOptions("image.pool", poolSchema, { execLimits: { memoryMib: 99 } }).execLimits).toEqual({ memoryMib: 99 });
    expect(refused(() => parseOptions("image.pool", poolSchema, { execLimits: { processes: -1 } })).message).toMatch(/image\.pool: execLimits\.processes/);
    expect(mergeLimits({ processes: 1, memoryMib: 2 }, { memoryMib: 3 })).toEqual({ processes: 1, memoryMib: 3 });
    expect(mergeLimits(undefined, undefined)).toBeUndefined();
    expect(mergeLimits({}, {})).toBeUndefined();
  });

  it("pool: min over max is refused; max follows min", () => {
    expect(parseOptions("image.pool", poolSchema, { min: 3 }).max).toBe(3);
    expect(refused(() => parseOptions("image.pool", poolSchema, { min: 5, max: 2 })).message).toContain("min is larger than max (2), got 5");
  });

  it("files: the 4 MiB default is configurable", () => {
    expect(parseOptions("vm.readFile", readFileSchema, {}).maxBytes).toBe(4 * 1024 * 1024);
    expect(parseOptions("vm.readFile", readFileSchema, { maxBytes: 10 }).maxBytes).toBe(10);
  });
});
