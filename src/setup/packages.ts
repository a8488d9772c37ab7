/**
 * The Debian packages supermachine needs, and installing the missing ones: the runtime's on every
 * host, those that build each guest artifact only when the cache lacks it, and in this repository
 * those the tests use too. What to do about them is decided from facts (`aptDecision`): nothing;
 * apt-get as root; apt-get through `sudo -n`; or, for a user without either, stop before doing
 * anything else and print the one line to run.
 */
import { spawnSync } from "node:child_process";
import { SetupError } from "../errors.js";
import { secs, type SetupContext } from "./context.js";

/** What the runtime needs on every host. */
const RUNTIME_PACKAGES: Record<string, string> = {
  "qemu-system-x86": "the hypervisor",
  "squashfs-tools": "sqfstar, to turn images into squashfs root filesystems",
  "util-linux": "setpriv, which ties every QEMU process to its owner and drops its privileges",
  passwd: "useradd, for the unprivileged user QEMU runs as",
  zstd: "zstd-compressed image layers",
};

export type Artifact = "kernel" | "agent" | "busybox";

/** What building each guest artifact needs (only when it is not in the cache yet). */
const BUILD_PACKAGES: Record<Artifact, Record<string, string>> = {
  busybox: { "busybox-static": "the built-in busybox image" },
  kernel: {
    "linux-source-6.1": "guest kernel sources",
    bc: "kernel build",
    bison: "kernel build",
    flex: "kernel build",
    "libelf-dev": "kernel build",
    make: "kernel build",
    gcc: "kernel build",
    "xz-utils": "unpacking the kernel sources",
  },
  agent: {
    cpio: "packing the agent initramfs",
    file: "checking the agent binary is static",
    "librust-libc-dev": "the agent's only crate",
  },
};

/** In this repository: everything, the tests' tools included. */
const REPO_PACKAGES: Record<string, string> = {
  ...RUNTIME_PACKAGES,
  ...BUILD_PACKAGES.busybox,
  ...BUILD_PACKAGES.kernel,
  ...BUILD_PACKAGES.agent,
  "docker-registry": "tests: a real OCI distribution registry on loopback",
  skopeo: "tests: pushing fixture images, writing docker archives",
  mmdebstrap: "tests: building the Debian python fixture image",
  openssl: "tests: a self-signed CA for the TLS registry",
  "apache2-utils": "tests: htpasswd for the registry with basic auth",
  graphviz: "tests: checking graph --format dot output",
  chromium: "tests: the serve page in a headless browser",
};

/** "cargo" stands for the Rust toolchain: Debian's cargo and rustc packages. */
export const debianNames = (missing: string[]): string[] => missing.flatMap((n) => (n === "cargo" ? ["cargo", "rustc"] : [n]));

/** The one line a user without root runs. */
export const installLine = (missing: string[]): string => `sudo apt-get install -y --no-install-recommends ${debianNames(missing).join(" ")}`;

export type AptDecision = { action: "none" } | { action: "install"; prefix: string[]; packages: string[] } | { action: "ask"; line: string };

/** What to do about `missing` packages: `sudo` says whether `sudo -n` may run commands (asked only when needed). */
export function aptDecision(facts: { missing: string[]; uid: number | undefined; sudo: () => boolean }): AptDecision {
  if (facts.missing.length === 0) return { action: "none" };
  const packages = debianNames(facts.missing);
  if (facts.uid === 0) return { action: "install", prefix: [], packages };
  if (facts.sudo()) return { action: "install", prefix: ["sudo", "-n"], packages };
  return { action: "ask", line: installLine(facts.missing) };
}

function notInstalled(names: string[]): string[] {
  if (names.length === 0) return [];
  const r = spawnSync("dpkg-query", ["-W", "-f=${Package} ${db:Status-Abbrev}\n", ...names], { encoding: "utf8" });
  if (r.error) throw new SetupError("SETUP_HOST_UNSUPPORTED", "dpkg-query is not available: supermachine's setup expects a Debian-based Linux host");
  const installed = new Set(r.stdout.split("\n").filter((l) => /\sii\s*$/.test(l)).map((l) => l.split(" ")[0]));
  return names.filter((n) => !installed.has(n));
}

const hasCargo = (ctx: SetupContext): boolean => spawnSync("cargo", ["--version"], { env: ctx.buildEnv }).status === 0;

/** The packages missing for what this run needs (`need`: the artifacts the cache lacks). */
export function missingPackages(ctx: SetupContext, need: Artifact[]): string[] {
  const names = ctx.artifactsOnly ? [...Object.keys(RUNTIME_PACKAGES), ...need.flatMap((k) => Object.keys(BUILD_PACKAGES[k]))] : Object.keys(REPO_PACKAGES);
  const missing = notInstalled(names);
  if ((!ctx.artifactsOnly || need.includes("agent")) && !hasCargo(ctx)) missing.push("cargo");
  return missing;
}

/** Installs the missing packages, or (no root, no sudo) stops with the one line to run. */
export function ensurePackages(ctx: SetupContext, need: Artifact[]): void {
  if (ctx.flags.skipApt) return;
  const missing = missingPackages(ctx, need);
  const plan = aptDecision({
    missing,
    uid: process.getuid?.(),
    sudo: () => spawnSync("sudo", ["-n", "true"], { stdio: "ignore", timeout: 10_000 }).status === 0,
  });
  if (plan.action === "none") return;
  if (plan.action === "ask") {
    // Not root and no password-less sudo: nothing is installed, built or created; one line to run.
    if (!ctx.flags.json) process.stdout.write(`${plan.line}\n`);
    throw new SetupError(
      "SETUP_APT_NEEDS_ROOT",
      `Debian packages are missing (${missing.join(", ")}) and this user (uid ${process.getuid?.()}) cannot install them: it is not root and has no password-less sudo`,
      { hint: `run: ${plan.line}; then run ${ctx.setupCmd} again (or pass --skip-apt to go on without them)` },
    );
  }
  const t0 = Date.now();
  ctx.say(`installing Debian packages: ${plan.packages.join(", ")}`);
  const apt = (...a: string[]) => {
    const [cmd, ...rest] = [...plan.prefix, "apt-get", ...a] as [string, ...string[]];
    return spawnSync(cmd, rest, { stdio: ["ignore", "ignore", "inherit"], env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" } }).status === 0;
  };
  const line = installLine(missing);
  if (!apt("update", "-q")) throw new SetupError("SETUP_APT_FAILED", "apt-get update failed", { hint: `install them yourself: ${line}` });
  if (!apt("install", "-y", "-q", "--no-install-recommends", ...plan.packages)) {
    throw new SetupError("SETUP_APT_FAILED", `apt-get install ${plan.packages.join(" ")} failed`, { hint: `run it yourself to see why: ${line}` });
  }
  ctx.say(`packages installed in ${secs(t0)}`);
}
