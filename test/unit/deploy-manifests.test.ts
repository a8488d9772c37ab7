// The deployment manifests under deploy/ agree with the Kubernetes API and with what
// `supermachine serve` offers. Kubernetes: every object of the kustomize base, and of each overlay
// rendered by applying its JSON6902 patches to the base objects they target, is validated against
// the Kubernetes OpenAPI schemas (kubernetes-models); then the facts serve depends on are checked:
// probe paths and ports, Service ports, the flags in the container args, the key and config
// mounts, the front's --nodes target and the drain grace against the termination grace period.
// Nomad: both job files are parsed (@cdktf/hcl2json) and checked for the same facts.
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import fastJsonPatch, { type Operation } from "fast-json-patch";
import { describe, expect, it } from "vitest";
import { parseAllDocuments, parse as parseYaml } from "yaml";
import { createProgram } from "../../src/cli/program.js";

const root = join(import.meta.dirname, "..", "..");
const k8sDir = join(root, "deploy", "kubernetes");
const nomadDir = join(root, "deploy", "nomad");

const LISTEN_PORT = 8080;
const CONFIG_PATH = "/etc/supermachine/supermachine.config.ts";
const KEYS_PATH = "/etc/supermachine/keys/keys.json";

// ---- Kubernetes: loading and rendering -----------------------------------------------------------

type K8sObject = { apiVersion: string; kind: string; metadata: { name: string; [k: string]: unknown }; [k: string]: any };

interface Kustomization {
  resources?: string[];
  patches?: { path: string; target: { group?: string; version?: string; kind: string; name: string } }[];
}

const readYaml = (file: string): unknown => parseYaml(readFileSync(file, "utf8"));

function loadObjects(file: string): K8sObject[] {
  return parseAllDocuments(readFileSync(file, "utf8")).map((d) => {
    if (d.errors.length) throw new Error(`${file}: ${d.errors[0]!.message}`);
    return d.toJS() as K8sObject;
  });
}

function baseObjects(): K8sObject[] {
  const k = readYaml(join(k8sDir, "base", "kustomization.yaml")) as Kustomization;
  return (k.resources ?? []).flatMap((r) => loadObjects(join(k8sDir, "base", r)));
}

const groupOf = (apiVersion: string) => (apiVersion.includes("/") ? apiVersion.split("/")[0]! : "");
const versionOf = (apiVersion: string) => apiVersion.split("/").pop()!;

/** An overlay's objects: the base (its only resource) with each JSON6902 patch applied to its target. */
function render(overlay: string): K8sObject[] {
  const dir = join(k8sDir, "overlays", overlay);
  const k = readYaml(join(dir, "kustomization.yaml")) as Kustomization;
  expect(k.resources).toEqual(["../../base"]);
  const objects = structuredClone(baseObjects());
  for (const p of k.patches ?? []) {
    const ops = readYaml(join(dir, p.path)) as Operation[];
    expect(Array.isArray(ops), `${overlay}/${p.path} is a list of JSON6902 operations`).toBe(true);
    const t = p.target;
    const targets = objects.filter(
      (o) => o.kind === t.kind && o.metadata.name === t.name && (t.group === undefined || groupOf(o.apiVersion) === t.group) && (t.version === undefined || versionOf(o.apiVersion) === t.version),
    );
    expect(targets.length, `${overlay}/${p.path} targets one object`).toBe(1);
    // validate: every operation's path must exist where it needs to; `test` operations must hold.
    fastJsonPatch.applyPatch(targets[0], ops, true, true);
  }
  return objects;
}

const overlays = readdirSync(join(k8sDir, "overlays")).sort();

/** Validates `obj` against its kind's OpenAPI schema; throws with the first violation. */
async function validate(obj: K8sObject): Promise<void> {
  const mod = (await import(/* @vite-ignore */ `kubernetes-models/${obj.apiVersion}/${obj.kind}`)) as Record<string, new (o: unknown) => { validate(): void }>;
  const Model = mod[obj.kind];
  if (!Model) throw new Error(`kubernetes-models has no ${obj.apiVersion} ${obj.kind}`);
  new Model(obj).validate();
}

// ---- what serve offers -------------------------------------------------------------------------

async function serveFlags(): Promise<Set<string>> {
  const program = await createProgram([]);
  const serve = program.commands.find((c) => c.name() === "serve");
  if (!serve) throw new Error("no serve command");
  return new Set([...serve.options, ...program.options].map((o) => o.long).filter((l): l is string => l !== undefined));
}

/** `--flag value` pairs and bare flags of an argument list (after the `serve` subcommand). */
function parseArgs(args: string[]): Map<string, string | true> {
  expect(args[0]).toBe("serve");
  const out = new Map<string, string | true>();
  for (let i = 1; i < args.length; i++) {
    const a = args[i]!;
    expect(a.startsWith("--"), `argument ${JSON.stringify(a)} is a flag or a flag's value`).toBe(true);
    const next = args[i + 1];
    if (next !== undefined && !next.startsWith("--")) {
      out.set(a, next);
      i++;
    } else out.set(a, true);
  }
  return out;
}

async function checkFlags(args: Map<string, string | true>, where: string): Promise<void> {
  const known = await serveFlags();
  for (const flag of args.keys()) {
    expect(known.has(flag), `${where}: ${flag} is a flag of supermachine serve`).toBe(true);
  }
}

const listenPort = (args: Map<string, string | true>): number => {
  const listen = args.get("--listen");
  expect(typeof listen).toBe("string");
  const m = /^0\.0\.0\.0:(\d+)$/.exec(listen as string);
  expect(m, "--listen binds every interface of the pod").not.toBeNull();
  return Number(m![1]);
};

// ---- Kubernetes: the checks ----------------------------------------------------------------------

function checkCluster(objects: K8sObject[], label: string): Promise<void>[] {
  const byKind = (kind: string, name: string) => {
    const o = objects.find((x) => x.kind === kind && x.metadata.name === name);
    expect(o, `${label}: ${kind} ${name}`).toBeDefined();
    return o!;
  };
  const checks: Promise<void>[] = [];
  const ds = byKind("DaemonSet", "supermachine-node");
  const front = byKind("Deployment", "supermachine-front");
  const nodeSvc = byKind("Service", "supermachine-node");
  const frontSvc = byKind("Service", "supermachine");

  for (const [workload, svc] of [
    [ds, nodeSvc],
    [front, frontSvc],
  ] as const) {
    const pod = workload.spec.template;
    const c = pod.spec.containers[0];
    const where = `${label}: ${workload.kind} ${workload.metadata.name}`;
    const args = parseArgs(c.args);
    checks.push(checkFlags(args, where));
    const port = listenPort(args);
    expect(port).toBe(LISTEN_PORT);
    const named = c.ports.find((p: { containerPort: number }) => p.containerPort === port);
    expect(named, `${where}: a container port for --listen ${port}`).toBeDefined();
    const portRefs = (ref: number | string) => ref === port || ref === named.name;
    expect(c.readinessProbe.httpGet.path).toBe("/readyz");
    expect(c.livenessProbe.httpGet.path).toBe("/healthz");
    expect(portRefs(c.readinessProbe.httpGet.port), `${where}: readiness probe port`).toBe(true);
    expect(portRefs(c.livenessProbe.httpGet.port), `${where}: liveness probe port`).toBe(true);
    // The Service selects these pods and reaches the container port.
    for (const [k, v] of Object.entries(svc.spec.selector as Record<string, string>)) expect(pod.metadata.labels[k], `${where}: label ${k}`).toBe(v);
    for (const sp of svc.spec.ports) expect(portRefs(sp.targetPort ?? sp.port), `${label}: Service ${svc.metadata.name} port ${sp.name}`).toBe(true);
    // Draining outlasts neither preStop nor the grace period: the kubelet would kill it mid-drain.
    const drain = Number(args.get("--drain-grace") ?? 30);
    const preStop = c.lifecycle?.preStop?.exec?.command;
    const preStopSecs = preStop?.[0] === "sleep" ? Number(preStop[1]) : 0;
    expect(pod.spec.terminationGracePeriodSeconds, `${where}: terminationGracePeriodSeconds > preStop + --drain-grace`).toBeGreaterThan(drain + preStopSecs);
    // A read-only root has somewhere to write: SUPERMACHINE_HOME is a mounted volume or under one.
    const home = c.env.find((e: { name: string }) => e.name === "SUPERMACHINE_HOME")?.value as string | undefined;
    expect(home, `${where}: SUPERMACHINE_HOME`).toBeDefined();
    if (c.securityContext?.readOnlyRootFilesystem) {
      expect(c.volumeMounts.some((m: { mountPath: string; readOnly?: boolean }) => !m.readOnly && (home === m.mountPath || home!.startsWith(`${m.mountPath}/`))), `${where}: ${home} is on a writable volume`).toBe(true);
    }
  }

  // The node: keys from the Secret and config from the ConfigMap, at the paths its args name.
  const node = ds.spec.template.spec;
  const nc = node.containers[0];
  const nodeArgs = parseArgs(nc.args);
  expect(nodeArgs.get("--keys")).toBe(KEYS_PATH);
  expect(nodeArgs.get("--config")).toBe(CONFIG_PATH);
  expect(nodeArgs.get("--frozen")).toBe(true);
  expect(nodeArgs.get("--lazy")).toBe(true);
  expect(typeof nodeArgs.get("--cache-from")).toBe("string");
  const volume = (name: string) => node.volumes.find((v: { name: string }) => v.name === name);
  const mountOf = (path: string) =>
    nc.volumeMounts.find((m: { mountPath: string; subPath?: string }) => (m.subPath ? m.mountPath === path : path.startsWith(`${m.mountPath}/`)));
  const keysMount = mountOf(KEYS_PATH);
  expect(keysMount, "a mount holds --keys").toBeDefined();
  const keysVol = volume(keysMount.name);
  expect(keysVol.secret?.secretName).toBe("supermachine-keys");
  expect(keysMount.readOnly).toBe(true);
  const keysItem = keysVol.secret.items?.find((i: { path: string }) => join(keysMount.mountPath, i.path) === KEYS_PATH)?.key ?? KEYS_PATH.slice(keysMount.mountPath.length + 1);
  expect(keysItem, "the Secret's key is the file name --keys reads").toBe("keys.json");
  const configMount = mountOf(CONFIG_PATH);
  expect(configMount, "a mount holds --config").toBeDefined();
  const cmName = volume(configMount.name).configMap?.name;
  const cm = byKind("ConfigMap", cmName);
  expect(Object.keys(cm.data)).toContain(configMount.subPath ?? CONFIG_PATH.slice(configMount.mountPath.length + 1));
  // The home is on the node, so the snapshot cache survives the pod.
  const homeVol = volume(nc.volumeMounts.find((m: { mountPath: string }) => m.mountPath === "/var/lib/supermachine").name);
  expect(homeVol.hostPath?.path).toBe("/var/lib/supermachine");
  // --node-name comes from the downward API.
  const nodeName = /^\$\((\w+)\)$/.exec(String(nodeArgs.get("--node-name")))?.[1];
  expect(nc.env.find((e: { name: string }) => e.name === nodeName)?.valueFrom?.fieldRef?.fieldPath, "--node-name is the Kubernetes node's name").toBe("spec.nodeName");

  // The front reaches the nodes: through the headless Service's DNS name and port, or by a label
  // selector that picks the node pods (then with RBAC to watch pods).
  const fc = front.spec.template.spec.containers[0];
  const frontArgs = parseArgs(fc.args);
  expect(frontArgs.get("--front")).toBe(true);
  const nodes = String(frontArgs.get("--nodes"));
  expect(nodeSvc.spec.clusterIP).toBe("None");
  const dns = /^dns:([^:]+):(\d+)$/.exec(nodes);
  const k8s = /^k8s:(.+)$/.exec(nodes);
  expect(dns ?? k8s, `--nodes ${nodes} is dns:<name>:<port> or k8s:<selector>`).not.toBeNull();
  if (dns) {
    const [host, port] = [dns[1]!, Number(dns[2])];
    const ns = /^\$\((\w+)\)$/.exec(host.split(".")[1] ?? "")?.[1];
    expect(host.split(".")[0]).toBe(nodeSvc.metadata.name);
    if (ns) expect(fc.env.find((e: { name: string }) => e.name === ns)?.valueFrom?.fieldRef?.fieldPath).toBe("metadata.namespace");
    expect(nodeSvc.spec.ports.map((p: { port: number }) => p.port)).toContain(port);
  } else {
    const selector = Object.fromEntries(k8s![1]!.split(",").map((kv) => kv.split("=") as [string, string]));
    for (const [k, v] of Object.entries(selector)) expect(ds.spec.template.metadata.labels[k]).toBe(v);
    expect(Number(frontArgs.get("--node-port") ?? 8080)).toBe(listenPort(nodeArgs));
  }
  const sa = front.spec.template.spec.serviceAccountName;
  const binding = objects.find((o) => o.kind === "RoleBinding" && o.subjects?.some((s: { kind: string; name: string }) => s.kind === "ServiceAccount" && s.name === sa));
  expect(binding, "the front's service account is bound to a Role").toBeDefined();
  const role = byKind("Role", binding!.roleRef.name);
  const podRule = role.rules.find((r: { resources: string[] }) => r.resources.includes("pods"));
  expect([...podRule.verbs].sort()).toEqual(["get", "list", "watch"]);
  byKind("ServiceAccount", sa);
  return checks;
}

describe("deploy/kubernetes", () => {
  it("has the overlays the docs describe", () => {
    expect(overlays).toEqual(["device-plugin", "privileged", "tcg"]);
  });

  it("base: every object is valid against the Kubernetes schemas and consistent with serve", async () => {
    const objects = baseObjects();
    expect(objects.map((o) => o.kind).sort()).toEqual(["ConfigMap", "DaemonSet", "Deployment", "Role", "RoleBinding", "Service", "Service", "ServiceAccount"]);
    for (const o of objects) expect(o.metadata.namespace, `${o.kind} ${o.metadata.name}: the namespace comes from the kustomization`).toBeUndefined();
    for (const o of objects) await validate(o);
    await Promise.all(checkCluster(objects, "base"));
    const kvm = objects.find((o) => o.kind === "DaemonSet")!.spec.template.spec;
    expect(kvm.containers[0].resources.limits["devices.kubevirt.io/kvm"]).toBe("1");
    expect(kvm.nodeSelector["supermachine.dev/kvm"]).toBe("true");
  });

  for (const overlay of overlays) {
    it(`overlay ${overlay}: renders, validates and stays consistent with serve`, async () => {
      const objects = render(overlay);
      for (const o of objects) await validate(o);
      await Promise.all(checkCluster(objects, overlay));
      const pod = objects.find((o) => o.kind === "DaemonSet")!.spec.template.spec;
      const c = pod.containers[0];
      const kvmLimit = c.resources.limits["devices.kubevirt.io/kvm"];
      const kvmMount = c.volumeMounts.find((m: { mountPath: string }) => m.mountPath === "/dev/kvm");
      if (overlay === "device-plugin") {
        expect(kvmLimit).toBe("1");
        expect(c.securityContext.privileged).toBeUndefined();
      } else if (overlay === "privileged") {
        expect(kvmLimit).toBeUndefined();
        expect(c.securityContext.privileged).toBe(true);
        expect(pod.volumes.find((v: { name: string }) => v.name === kvmMount?.name)?.hostPath).toEqual({ path: "/dev/kvm", type: "CharDevice" });
      } else if (overlay === "tcg") {
        expect(kvmLimit).toBeUndefined();
        expect(kvmMount).toBeUndefined();
        expect(pod.nodeSelector["supermachine.dev/kvm"]).toBeUndefined();
      }
    });
  }

  it("would notice a schema violation and a patch that misses its target", async () => {
    const ds = structuredClone(baseObjects().find((o) => o.kind === "DaemonSet")!);
    ds.spec.template.spec.containers[0].ports[0].containerPort = "http";
    await expect(validate(ds)).rejects.toThrow(/containerPort/);
    expect(() => fastJsonPatch.applyPatch(structuredClone(ds), [{ op: "remove", path: "/spec/template/spec/nodeSelector/nope" }], true, true)).toThrow();
    expect(() => parseArgs(["serve", "--listen", "0.0.0.0:8080", "stray"])).toThrow();
  });
});

// ---- Nomad -------------------------------------------------------------------------------------

interface HclJob {
  type: string;
  group: Record<string, HclGroup[]>;
}
interface HclGroup {
  network?: { port: Record<string, { static?: number; to?: number }[]> }[];
  service?: { name: string; port: string; check: { type: string; path: string }[] }[];
  task: Record<string, { driver: string; kill_timeout?: string; shutdown_delay?: string; config: { args: string[]; devices?: { host_path: string }[]; mount?: { source: string; target: string }[] }[]; template?: { destination: string; env?: boolean; data: string }[] }[]>;
}

/**
 * HCL to JSON. The package is imported by a name TypeScript does not resolve: its declarations
 * reference the DOM library, which would change the fetch and stream types of the whole
 * type-check (tsconfig.check.json).
 */
async function parseHcl(file: string, text: string): Promise<unknown> {
  const name = "@cdktf/hcl2json";
  const { parse } = (await import(/* @vite-ignore */ name)) as { parse(file: string, text: string): Promise<unknown> };
  return parse(file, text);
}

async function nomadJob(file: string): Promise<[string, HclJob]> {
  const json = (await parseHcl(file, readFileSync(join(nomadDir, file), "utf8"))) as { job: Record<string, HclJob[]> };
  const entries = Object.entries(json.job);
  expect(entries.length, `${file} holds one job`).toBe(1);
  return [entries[0]![0], entries[0]![1][0]!];
}

const seconds = (d: string | undefined): number => {
  const m = /^(\d+)s$/.exec(d ?? "0s");
  expect(m, `duration ${d} in seconds`).not.toBeNull();
  return Number(m![1]);
};

async function checkNomadGroup(group: HclGroup, where: string): Promise<{ args: Map<string, string | true>; task: HclGroup["task"][string][number] }> {
  const tasks = Object.values(group.task);
  expect(tasks.length).toBe(1);
  const task = tasks[0]![0]!;
  expect(task.driver).toBe("docker");
  const args = parseArgs(task.config[0]!.args);
  await checkFlags(args, where);
  const port = listenPort(args);
  const ports = group.network![0]!.port;
  const service = group.service![0]!;
  const portSpec = ports[service.port]?.[0];
  expect(portSpec, `${where}: the service's port ${service.port} is in the network block`).toBeDefined();
  expect(portSpec!.to, `${where}: the mapped container port is --listen's`).toBe(port);
  expect(service.check.map((c) => [c.type, c.path]).sort()).toEqual([
    ["http", "/healthz"],
    ["http", "/readyz"],
  ]);
  const drain = Number(args.get("--drain-grace") ?? 30);
  expect(seconds(task.kill_timeout), `${where}: kill_timeout > --drain-grace`).toBeGreaterThan(drain);
  return { args, task };
}

describe("deploy/nomad", () => {
  it("the node job: a system job whose checks, ports, args, devices and mounts agree with serve", async () => {
    const [name, job] = await nomadJob("supermachine.nomad.hcl");
    expect(name).toBe("supermachine-node");
    expect(job.type).toBe("system");
    const group = Object.values(job.group)[0]![0]!;
    const { args, task } = await checkNomadGroup(group, "nomad node");
    expect(group.service![0]!.name).toBe("supermachine-node");
    expect(args.get("--keys")).toBe(KEYS_PATH);
    expect(args.get("--config")).toBe(CONFIG_PATH);
    expect(args.get("--frozen")).toBe(true);
    expect(args.get("--lazy")).toBe(true);
    const config = task.config[0]!;
    expect(config.devices?.map((d) => d.host_path)).toContain("/dev/kvm");
    const targets = new Map((config.mount ?? []).map((m) => [m.target, m.source]));
    expect(targets.get("/var/lib/supermachine")).toBe("/var/lib/supermachine");
    expect(targets.get(CONFIG_PATH)).toBe("local/supermachine.config.ts");
    expect(targets.get("/etc/supermachine/keys")).toBe("secrets/keys");
    const rendered = (task.template ?? []).map((t) => t.destination);
    expect(rendered).toEqual(expect.arrayContaining(["local/supermachine.config.ts", "secrets/keys/keys.json"]));
  });

  it("the front job: a service job of two that lists the node service's addresses for --nodes", async () => {
    const [name, job] = await nomadJob("supermachine-front.nomad.hcl");
    expect(name).toBe("supermachine-front");
    expect(job.type).toBe("service");
    const group = Object.values(job.group)[0]![0]! as HclGroup & { count: number };
    expect(group.count).toBe(2);
    const { args, task } = await checkNomadGroup(group, "nomad front");
    expect(args.get("--front")).toBe(true);
    expect(args.get("--nodes")).toBe("${SUPERMACHINE_NODES}");
    const tpl = task.template ?? [];
    const nodesTpl = tpl.find((t) => t.env && t.data.includes("SUPERMACHINE_NODES="));
    expect(nodesTpl?.data).toContain('nomadService "supermachine-node"');
  });
});
