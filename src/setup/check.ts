/**
 * `setup --check`: what is there and what is missing, installing, building and creating
 * nothing. One line per item with a fix for what is missing (or one JSON object); exit 0 when
 * everything is there, 1 otherwise.
 */
import { existsSync, readFileSync } from "node:fs";
import { findInstallManifest } from "../engine/artifacts.js";
import { agentProtocol, agentVersion, plan, type ArtifactPlan } from "./artifacts.js";
import { duration, estimates, type SetupContext } from "./context.js";
import { manifestFor, manifestText } from "./manifest.js";
import { installLine, missingPackages } from "./packages.js";
import { qemuUserState } from "./confinement.js";

export interface CheckItem {
  name: string;
  ok: boolean;
  detail: string;
  fix?: string;
  source?: string;
  key?: string | null;
  path?: string;
  binary?: string;
  version?: string;
  inputs?: Record<string, string>;
  /** Why the prebuilt package was not used for this artifact. */
  prebuilt?: string;
}

export interface CheckReport {
  ok: boolean;
  mode: "package" | "repository";
  home: string;
  root: string;
  items: CheckItem[];
  missing: string[];
  estimateSeconds: number;
  setupCommand: string;
}

export function checkAll(ctx: SetupContext): CheckReport {
  const items: CheckItem[] = [];
  const add = (name: string, ok: boolean, detail: string, fix?: string): CheckItem => {
    const item: CheckItem = { name, ok, detail, ...(ok || fix === undefined ? {} : { fix }) };
    items.push(item);
    return item;
  };
  const p = plan(ctx);
  const est = estimates(ctx.cores);
  const plans = [p.kernel, p.agent, p.busybox] as const;
  const need = plans.filter((x) => !x.present).map((x) => x.name);
  const pkgs = missingPackages(ctx, need);
  add("packages", pkgs.length === 0, pkgs.length === 0 ? "installed" : `missing: ${pkgs.join(", ")}`, installLine(pkgs));
  if (!ctx.artifactsOnly && ctx.flags.repoState) {
    const r = ctx.flags.repoState;
    add("node_modules", r.nodeModules, r.nodeModules ? "matches package-lock.json" : "missing or stale", "npm run setup (runs npm ci)");
    add("dist", r.dist, r.dist ? "compiled from the current sources" : "missing or stale", "npm run setup (compiles TypeScript)");
  }
  const origin = (a: ArtifactPlan) =>
    a.source === "env" ? `from ${a.name === "kernel" ? "SUPERMACHINE_KERNEL" : "SUPERMACHINE_INITRAMFS"}: ` : a.source === "prebuilt" ? `from ${p.prebuilt.package}@${p.prebuilt.version}: ` : "";
  for (const a of [p.kernel, p.agent]) {
    let ok = a.present;
    let detail = ok ? origin(a) + a.path : a.source === "cache" ? `not in the cache (${a.dir})` : `${origin(a)}${a.path} does not exist`;
    if (ok && a.name === "agent" && a.source !== "env") {
      const proto = agentProtocol(ctx.root, a.binary!);
      if (!proto.ok) {
        ok = false;
        detail = `${a.dir} reports "${proto.reported}", its sources define protocol ${proto.proto}`;
      } else detail += ` (v${a.version ?? agentVersion(ctx.root)})`;
    }
    const fix = a.source === "cache" ? `${ctx.setupCmd} (builds it: about ${duration(est[a.name])})` : a.source === "env" ? "point the variable at an existing file, or unset it" : "reinstall the supermachine packages";
    const item = add(a.name, ok, detail, fix);
    Object.assign(item, { source: a.source, key: a.key, path: a.path, ...(a.inputs ? { inputs: a.inputs } : {}) });
    if (a.name === "agent") Object.assign(item, { binary: a.binary, version: a.version ?? agentVersion(ctx.root) });
    const why = p.prebuilt[a.name];
    if (a.source !== "prebuilt" && "reason" in why && why.reason) item.prebuilt = why.reason;
  }
  add("busybox", p.busybox.present, p.busybox.present ? p.busybox.dir : `not in the cache (${p.busybox.dir})`, `${ctx.setupCmd} (builds it: about ${duration(est.busybox)})`);
  if (p.kernel.present && p.agent.present) {
    const want = manifestText(manifestFor(ctx, p));
    const path = findInstallManifest(ctx.root, process.env);
    const ok = existsSync(path) && readFileSync(path, "utf8") === want;
    add("manifest", ok, ok ? path : `${path} ${existsSync(path) ? "points elsewhere" : "is missing"}`, `${ctx.setupCmd} (writes it)`);
  } else {
    add("manifest", false, "written once the kernel and the agent are built", ctx.setupCmd);
  }
  const qu = qemuUserState();
  if (qu) {
    add("qemu-user", qu.user !== undefined, qu.user ? `${qu.name} (uid ${qu.user.uid})` : `${qu.name} does not exist`, `${ctx.setupCmd} (creates it), or: useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ${qu.name}`);
  } else add("qemu-user", true, "not needed (QEMU runs as this user)");
  const missing = items.filter((i) => !i.ok).map((i) => i.name);
  let estimateSeconds = pkgs.length ? est.packages : 0;
  for (const x of plans) if (!x.present) estimateSeconds += est[x.name];
  return { ok: missing.length === 0, mode: ctx.artifactsOnly ? "package" : "repository", home: ctx.home, root: ctx.root, items, missing, estimateSeconds, setupCommand: ctx.setupCmd };
}

export function formatCheck(r: CheckReport): string {
  const width = Math.max(...r.items.map((i) => i.name.length));
  const lines = r.items.map((i) => `${i.ok ? "ok     " : "MISSING"}  ${i.name.padEnd(width)}  ${i.detail}${i.ok ? "" : `\n${" ".repeat(width + 11)}fix: ${i.fix}`}`);
  lines.push(
    r.ok
      ? `all present (cache: ${r.home})`
      : `missing: ${r.missing.join(", ")}; ${r.setupCommand} installs ${r.missing.length === 1 ? "it" : "them"}${r.estimateSeconds ? ` (about ${duration(r.estimateSeconds)})` : ""}`,
  );
  return lines.join("\n") + "\n";
}
