/**
 * The guest artifacts: where each is (found by the lookup order of src/engine/prebuilt.ts, else
 * in the cache under a key of its inputs) and building what the cache lacks. Every build writes
 * into a temporary directory that the store's publish procedure (src/store/publish.ts: lock,
 * fsync, rename) puts in place only when complete, so an interrupted build never leaves an
 * entry a later run trusts, and two setups on one machine never build the same thing at once.
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import { guestLookup, hashTree, type LookupHit, type PrebuiltState } from "../engine/prebuilt.js";
import { SetupError } from "../errors.js";
import { writeFileSynced } from "../store/durable.js";
import { holderInfo } from "../store/lock.js";
import { publish } from "../store/publish.js";
import { dpkgVersion, duration, estimates, run, secs, sha256, type SetupContext } from "./context.js";
import type { Artifact } from "./packages.js";

export interface ArtifactPlan {
  name: "kernel" | "agent";
  source: "env" | "prebuilt" | "cache";
  key: string | null;
  dir: string;
  path: string;
  files: string[];
  present: boolean;
  /** The agent binary (beside the initramfs). */
  binary?: string;
  /** The prebuilt agent's version. */
  version?: string;
  /** What a cache key was computed from. */
  inputs?: Record<string, string>;
}

export interface BusyboxPlan {
  name: "busybox";
  key: string;
  dir: string;
  stamp: string;
  present: boolean;
}

export interface Plans {
  kernel: ArtifactPlan;
  agent: ArtifactPlan;
  busybox: BusyboxPlan;
  /** The prebuilt package's state (why it is not used, when it is not). */
  prebuilt: PrebuiltState;
}

const found = (name: ArtifactPlan["name"], hit: LookupHit, extra: Partial<ArtifactPlan> = {}): ArtifactPlan => ({
  name,
  source: hit.source,
  key: hit.key,
  dir: dirname(hit.path),
  path: hit.path,
  files: [basename(hit.path)],
  present: existsSync(hit.path),
  ...extra,
});

/**
 * Where each artifact lives and whether it is there. Computing the plans reads and creates
 * nothing in the cache beyond stat calls; the kernel's and busybox's keys include package
 * versions, so plan after installing packages.
 */
export function plan(ctx: SetupContext): Plans {
  const look = guestLookup(ctx.root, process.env);
  let kernel: ArtifactPlan;
  if (look.kernel) kernel = found("kernel", look.kernel);
  else {
    const tree = hashTree(join(ctx.root, "native", "kernel"));
    const linuxSource = dpkgVersion("linux-source-6.1");
    const key = sha256(tree, linuxSource).slice(0, 16);
    const dir = join(ctx.home, "kernel", key);
    kernel = { name: "kernel", source: "cache", key, dir, path: join(dir, "vmlinux"), files: ["vmlinux"], present: existsSync(join(dir, "vmlinux")), inputs: { tree, linuxSource } };
  }
  let agent: ArtifactPlan;
  if (look.agent) {
    const pa = look.prebuilt.agent;
    agent = found("agent", look.agent, look.agent.source === "prebuilt" && "binary" in pa ? { binary: pa.binary, version: pa.version } : {});
  } else {
    const rustc = spawnSync("rustc", ["--version"], { encoding: "utf8", env: ctx.buildEnv }).stdout?.trim() ?? "";
    const tree = hashTree(join(ctx.root, "native", "agent"), (p) => p.endsWith("/target"));
    const key = sha256(tree, rustc).slice(0, 16);
    const dir = join(ctx.home, "agent", key);
    const files = ["initramfs.cpio", "supermachine-agent"];
    agent = {
      name: "agent",
      source: "cache",
      key,
      dir,
      path: join(dir, "initramfs.cpio"),
      binary: join(dir, "supermachine-agent"),
      files,
      present: files.every((f) => existsSync(join(dir, f))),
      inputs: { tree, rustc },
    };
  }
  const bkey = sha256(readFileSync(join(ctx.root, "scripts", "build-busybox-image.mjs")), dpkgVersion("busybox-static"));
  const bdir = join(ctx.home, "builtin", "busybox");
  const stamp = join(ctx.home, "builtin", ".busybox.key");
  const busybox: BusyboxPlan = { name: "busybox", key: bkey, dir: bdir, stamp, present: existsSync(join(bdir, "index.json")) && existsSync(stamp) && readFileSync(stamp, "utf8") === bkey };
  return { kernel, agent, busybox, prebuilt: look.prebuilt };
}

/** The artifacts the cache must build (not found elsewhere, not there yet). */
export const toBuild = (p: Plans): Array<ArtifactPlan | BusyboxPlan> =>
  [p.kernel, p.agent, p.busybox].filter((x) => !x.present && (x.name === "busybox" || x.source === "cache"));

/** Prints "<what>: still building, 2.5 min so far (about 6 min left)" every 30 s. */
function ticker(ctx: SetupContext, what: Artifact, expectS: number): () => void {
  const t0 = Date.now();
  const timer = setInterval(() => {
    const so = (Date.now() - t0) / 1000;
    ctx.say(`${what}: still building, ${duration(so)} so far (${so < expectS ? `about ${duration(expectS - so)} left` : `expected about ${duration(expectS)}`})`);
  }, 30_000);
  return () => clearInterval(timer);
}

/** Builds `plan` into the cache unless it is complete there, through the store's publish procedure. */
async function ensureBuilt(ctx: SetupContext, plan: ArtifactPlan, build: (out: string) => Promise<void>, step: string): Promise<string> {
  const { name: kind, dir, files } = plan;
  const complete = async () => (files.every((f) => existsSync(join(dir, f))) ? dir : undefined);
  mkdirSync(dirname(dir), { recursive: true });
  const expect = estimates(ctx.cores)[kind];
  let told = false;
  let t0 = 0;
  await publish({
    target: dir,
    kind: "dir",
    what: `the ${kind} build ${plan.key}`,
    check: complete,
    lockTimeoutMs: 30 * 60_000,
    onWait: (w) => {
      if (told) return;
      told = true;
      const holder = holderInfo(w);
      ctx.say(`${kind}: waiting for another setup building it${holder ? ` (${holder})` : ""}`);
    },
    write: async (tmp) => {
      t0 = Date.now();
      ctx.say(`${step}${kind}: building (about ${duration(expect)} on ${ctx.cores} core${ctx.cores === 1 ? "" : "s"})`);
      const stop = ticker(ctx, kind, expect);
      try {
        await build(tmp);
      } finally {
        stop();
      }
      for (const f of files) if (!existsSync(join(tmp, f))) throw new SetupError("SETUP_BUILD_FAILED", `the ${kind} build did not produce ${f}`);
      return dir;
    },
  });
  if (t0) ctx.say(`${kind}: built in ${secs(t0)} -> ${dir}`);
  return dir;
}

/** Runs a build script without blocking the event loop (the progress ticker runs meanwhile). */
function buildWith(ctx: SetupContext, script: string, extraEnv: () => NodeJS.ProcessEnv = () => ({})): (out: string) => Promise<void> {
  return (out) =>
    new Promise((resolve, reject) => {
      const child = spawn("bash", [join(ctx.root, script), out], { stdio: ["ignore", "ignore", "inherit"], cwd: ctx.root, env: { ...ctx.buildEnv, ...extraEnv() } });
      child.on("error", (err) => reject(new SetupError("SETUP_BUILD_FAILED", `${script} could not start: ${err.message}`)));
      child.on("exit", (code, signal) =>
        code === 0 ? resolve() : reject(new SetupError("SETUP_BUILD_FAILED", `${script} failed (exit ${code ?? signal})`, { hint: `see the output above; logs are in ${out}` })),
      );
    });
}

export async function ensureKernel(ctx: SetupContext, p: ArtifactPlan, step: string): Promise<void> {
  if (p.source !== "cache") {
    if (!p.present) throw new SetupError("SETUP_KERNEL_MISSING", `SUPERMACHINE_KERNEL names ${p.path}, which does not exist`, { hint: "unset it to use the prebuilt package or the cache" });
    return;
  }
  await ensureBuilt(ctx, p, buildWith(ctx, "native/kernel/build.sh"), step);
}

/** The protocol version the agent's sources define, and what a built binary reports. */
export function agentProtocol(root: string, binary: string): { proto: string | undefined; reported: string; ok: boolean } {
  const proto = /pub const VERSION: u16 = (\d+);/.exec(readFileSync(join(root, "native", "agent", "src", "proto.rs"), "utf8"))?.[1];
  const reported = (spawnSync(binary, ["--version"], { encoding: "utf8" }).stdout ?? "").trim();
  return { proto, reported, ok: !proto || reported.includes(`(protocol ${proto})`) };
}

export function agentVersion(root: string): string {
  return /^version\s*=\s*"([^"]+)"/m.exec(readFileSync(join(root, "native", "agent", "Cargo.toml"), "utf8"))?.[1] ?? "unknown";
}

export async function ensureAgent(ctx: SetupContext, p: ArtifactPlan, step: string): Promise<void> {
  if (p.source === "env") {
    if (!p.present) throw new SetupError("SETUP_AGENT_MISSING", `SUPERMACHINE_INITRAMFS names ${p.path}, which does not exist`, { hint: "unset it to use the prebuilt package or the cache" });
    return;
  }
  if (p.source === "prebuilt") {
    const a = agentProtocol(ctx.root, p.binary!);
    if (!a.ok) {
      throw new SetupError("SETUP_AGENT_MISMATCH", `the prebuilt agent ${p.binary} reports "${a.reported}", but this version's sources define protocol ${a.proto}`, {
        hint: `reinstall the supermachine packages, or set SUPERMACHINE_NO_PREBUILT=1 and run ${ctx.setupCmd} to build it`,
      });
    }
    return;
  }
  // A cargo target directory of its own for each build: one shared between checkouts can hand a
  // binary of another checkout's sources to this key (cargo judges freshness by mtimes).
  let target: string | undefined;
  const build = buildWith(ctx, "native/agent/build.sh", () => ({ CARGO_TARGET_DIR: (target = mkdtempSync(join(tmpdir(), "supermachine-agent-target-"))) }));
  try {
    await ensureBuilt(ctx, p, build, step);
  } finally {
    if (target) rmSync(target, { recursive: true, force: true });
  }
  // The binary must be the one these sources make: it reports the protocol version they define.
  const a = agentProtocol(ctx.root, p.binary!);
  if (!a.ok) {
    rmSync(p.dir, { recursive: true, force: true });
    throw new SetupError("SETUP_AGENT_MISMATCH", `the agent built for key ${p.key} reports "${a.reported}", but its sources define protocol ${a.proto}`, {
      hint: `run ${ctx.setupCmd} again (the cached build was removed)`,
    });
  }
}

export async function ensureBusybox(ctx: SetupContext, p: BusyboxPlan, step: string): Promise<void> {
  if (p.present) return;
  const t0 = Date.now();
  ctx.say(`${step}builtin busybox image: building the OCI layout`);
  mkdirSync(dirname(p.dir), { recursive: true });
  await publish({
    target: p.dir,
    kind: "dir",
    what: "the built-in busybox image",
    // Present only with the stamp of these inputs: another one is rebuilt.
    check: async () => (existsSync(p.stamp) && readFileSync(p.stamp, "utf8") === p.key && existsSync(join(p.dir, "index.json")) ? p.dir : undefined),
    write: async (tmp) => {
      rmSync(tmp, { recursive: true, force: true });
      run(ctx, process.execPath, [join(ctx.root, "scripts", "build-busybox-image.mjs"), tmp]);
      return p.dir;
    },
  });
  await writeFileSynced(p.stamp + ".tmp", p.key);
  renameSync(p.stamp + ".tmp", p.stamp);
  ctx.say(`builtin busybox image built in ${secs(t0)}`);
}
