/**
 * `supermachine doctor`: reads the host's facts (Node, QEMU, CPU flags and /dev/kvm, the guest
 * artifacts, the cache directory, QEMU's confinement, the host identity snapshots record) and judges them with the checks of
 * `./checks.ts`. Reads only: it creates, tightens or builds nothing.
 */
import { spawnSync } from "node:child_process";
import { accessSync, constants, existsSync, readFileSync, statSync, statfsSync } from "node:fs";
import { userInfo } from "node:os";
import { dirname, join } from "node:path";
import { currentJsRuntime } from "../js-runtime.js";
import { PROTOCOL_VERSION } from "../agent/protocol.js";
import { hasHardwareVirt, hostAccelFacts } from "../engine/accel.js";
import { nativeArtifacts, packageRoot } from "../engine/artifacts.js";
import { confinementReport } from "../engine/confine.js";
import { hostIdentity, type HostIdentity } from "../engine/identity.js";
import { qemuBinary } from "../engine/qemu-binary.js";
import { SupermachineError } from "../errors.js";
import { supermachineHome } from "../paths.js";
import {
  type ArtifactsFacts,
  type Check,
  type DoctorReport,
  checkAccel,
  checkAgent,
  checkCache,
  checkDiskSpace,
  checkKernel,
  checkKvmGroup,
  checkRuntime,
  checkQemu,
  checkIdentity,
  checkSandbox,
  kernelVersionOf,
} from "./checks.js";

export * from "./checks.js";

export async function runDoctor(env: NodeJS.ProcessEnv = process.env): Promise<DoctorReport> {
  const accelFacts = hostAccelFacts(env);
  const artifacts = artifactsFacts(env);
  const home = supermachineHome(env);
  const checks: Check[] = [
    checkRuntime({ runtime: currentJsRuntime(), engines: packageEngines() }),
    checkQemu(qemuFacts()),
    checkAccel(accelFacts, env.SUPERMACHINE_ACCEL?.trim() || undefined),
    checkKvmGroup(kvmGroupFacts(accelFacts.kvmReadWrite, hasHardwareVirt(accelFacts.cpuFlags))),
    checkKernel(artifacts, "artifacts" in artifacts ? kernelVersion(artifacts.artifacts.kernel) : null),
    checkAgent(artifacts, "artifacts" in artifacts ? agentVersionOutput(artifacts.artifacts.initramfs) : null, PROTOCOL_VERSION),
    checkCache(cacheFacts(home)),
    checkDiskSpace(diskFacts(home)),
    checkSandbox(await confinementReport(qemuBinary(), env)),
  ];
  const identity = identityFacts(env);
  checks.push(checkIdentity(identity));
  return { checks, identity: "identity" in identity ? identity.identity : null, ok: checks.every((c) => c.status !== "fail") };
}

function identityFacts(env: NodeJS.ProcessEnv): { identity: HostIdentity } | { error: string; hint: string | undefined } {
  try {
    return { identity: hostIdentity(undefined, env) };
  } catch (e) {
    return { error: e instanceof Error ? e.message : String(e), hint: e instanceof SupermachineError ? e.hint : undefined };
  }
}

function packageEngines(): string | undefined {
  try {
    return (JSON.parse(readFileSync(join(packageRoot(), "package.json"), "utf8")) as { engines?: { node?: string } }).engines?.node;
  } catch {
    return undefined;
  }
}

function qemuFacts() {
  const binary = qemuBinary();
  const v = spawnSync(binary, ["--version"], { encoding: "utf8", timeout: 10_000 });
  if (v.status !== 0) {
    return { binary, versionOutput: null, error: v.error?.message ?? (v.stderr.trim() || `exit ${v.status ?? v.signal}`), machines: null };
  }
  const m = spawnSync(binary, ["-machine", "help"], { encoding: "utf8", timeout: 10_000 });
  return { binary, versionOutput: v.stdout, machines: m.status === 0 ? m.stdout : null };
}

function kvmGroupFacts(readWrite: boolean, hardwareVirt: boolean) {
  let device: { uid: number; gid: number; mode: number } | null = null;
  try {
    const st = statSync("/dev/kvm");
    device = { uid: st.uid, gid: st.gid, mode: st.mode };
  } catch {
    /* none */
  }
  let group: { name: string; members: string[] } | null = null;
  if (device) {
    const r = spawnSync("getent", ["group", String(device.gid)], { encoding: "utf8", timeout: 10_000 });
    const f = r.status === 0 ? r.stdout.trim().split(":") : [];
    if (f.length >= 4) group = { name: f[0]!, members: f[3]!.split(",").filter(Boolean) };
  }
  const uid = process.getuid?.() ?? -1;
  let userName = String(uid);
  try {
    userName = userInfo().username;
  } catch {
    /* no passwd entry */
  }
  return { uid, userName, groups: process.getgroups?.() ?? [], device, group, hardwareVirt, readWrite };
}

function artifactsFacts(env: NodeJS.ProcessEnv): ArtifactsFacts {
  try {
    return { artifacts: nativeArtifacts(env) };
  } catch (e) {
    if (e instanceof SupermachineError) return { error: { code: e.code, message: e.message, hint: e.hint } };
    return { error: { code: "UNKNOWN", message: String(e) } };
  }
}

function kernelVersion(path: string): string | null {
  try {
    return kernelVersionOf(readFileSync(path));
  } catch {
    return null;
  }
}

/** The agent binary setup keeps next to the initramfs, asked for its version (it is static; it runs on the host). */
function agentVersionOutput(initramfs: string): string | null {
  const bin = join(dirname(initramfs), "supermachine-agent");
  if (!existsSync(bin)) return null;
  const r = spawnSync(bin, ["--version"], { encoding: "utf8", timeout: 10_000 });
  return r.status === 0 ? r.stdout : null;
}

function cacheFacts(home: string) {
  const uid = process.getuid?.() ?? -1;
  try {
    const st = statSync(home);
    return { home, uid, stat: { uid: st.uid, mode: st.mode, isDirectory: st.isDirectory() } };
  } catch {
    let p = dirname(home);
    while (!existsSync(p) && dirname(p) !== p) p = dirname(p);
    let writable = true;
    try {
      accessSync(p, constants.W_OK | constants.X_OK);
    } catch {
      writable = false;
    }
    return { home, uid, stat: null, parent: { path: p, writable } };
  }
}

function diskFacts(home: string) {
  let p = home;
  while (!existsSync(p) && dirname(p) !== p) p = dirname(p);
  try {
    const s = statfsSync(p);
    return { path: p, freeBytes: s.bavail * s.bsize };
  } catch (e) {
    return { path: p, freeBytes: null, error: (e as Error).message };
  }
}
