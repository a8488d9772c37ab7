/**
 * Where a front finds its nodes (`--nodes`):
 * - a list, `host:port,host:port` (or URLs);
 * - `dns:<name>:<port>`: every address the name resolves to (a Kubernetes headless Service has
 *   one record per Ready Pod; a Nomad or Consul service name works the same way);
 * - `k8s:<label selector>`: the Ready Pods with those labels in the front's namespace, read from
 *   the Kubernetes API with the Pod's service account (through the official client), at
 *   `--node-port`.
 * Each returns base URLs; the front asks each for `/v1/node` and keeps the ones that answer.
 */
import { lookup } from "node:dns/promises";
import { readFileSync } from "node:fs";
import { ServerError } from "../errors.js";

export interface Discovery {
  /** What it reads from, for logs and `/v1/nodes`. */
  readonly source: string;
  /** The nodes' base URLs now. */
  nodes(): Promise<string[]>;
}

const hint = "give --nodes as host:port[,host:port...], dns:<name>:<port> or k8s:<label selector>";

function urlOf(hostPort: string, scheme: string, what: string): string {
  const url = /^https?:\/\//.test(hostPort) ? hostPort : `${scheme}://${hostPort}`;
  try {
    const u = new URL(url);
    if (!u.port && !/^https?:\/\//.test(hostPort)) throw new Error("no port");
    return u.origin;
  } catch {
    throw new ServerError("SERVER_BAD_REQUEST", `${what}: ${JSON.stringify(hostPort)} is not host:port`, { hint });
  }
}

export interface DiscoveryOptions {
  /** The nodes' port for `k8s:` (default 8080). */
  nodePort?: number;
  /** The namespace for `k8s:` (default: the service account's). */
  namespace?: string;
  /** `https` when nodes serve TLS. */
  scheme?: "http" | "https";
}

export function parseNodes(spec: string, opts: DiscoveryOptions = {}): Discovery {
  const scheme = opts.scheme ?? "http";
  const what = `--nodes ${spec}`;
  if (spec.startsWith("dns:")) {
    const m = spec.slice(4).match(/^(.+):(\d{1,5})$/);
    if (!m) throw new ServerError("SERVER_BAD_REQUEST", `${what}: expected dns:<name>:<port>`, { hint });
    const [, name, port] = m as unknown as [string, string, string];
    return {
      source: spec,
      async nodes() {
        const addrs = await lookup(name, { all: true }).catch(() => []);
        return [...new Set(addrs.map((a) => `${scheme}://${a.family === 6 ? `[${a.address}]` : a.address}:${port}`))];
      },
    };
  }
  if (spec.startsWith("k8s:")) return kubernetesPods(spec.slice(4), opts, scheme);
  const list = spec.split(",").map((s) => s.trim()).filter(Boolean);
  if (list.length === 0) throw new ServerError("SERVER_BAD_REQUEST", `${what}: names no node`, { hint });
  const urls = list.map((s) => urlOf(s, scheme, what));
  return { source: spec, nodes: async () => urls };
}

const SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

function kubernetesPods(selector: string, opts: DiscoveryOptions, scheme: string): Discovery {
  if (!selector) throw new ServerError("SERVER_BAD_REQUEST", "--nodes k8s: needs a label selector, e.g. k8s:app.kubernetes.io/name=supermachine-node", { hint });
  const port = opts.nodePort ?? 8080;
  let namespace = opts.namespace;
  type CoreApi = { listNamespacedPod(a: { namespace: string; labelSelector: string }): Promise<{ items: Pod[] }> };
  let api: Promise<CoreApi> | undefined;
  const client = () =>
    (api ??= (async () => {
      const k8s = await import("@kubernetes/client-node");
      const config = new k8s.KubeConfig();
      config.loadFromDefault(); // in a Pod: the service account; elsewhere: KUBECONFIG / ~/.kube/config
      if (!namespace) {
        try {
          namespace = readFileSync(SA_NAMESPACE, "utf8").trim();
        } catch {
          namespace = config.getContextObject(config.getCurrentContext())?.namespace ?? "default";
        }
      }
      return config.makeApiClient(k8s.CoreV1Api) as unknown as CoreApi;
    })());
  return {
    source: `k8s:${selector}`,
    async nodes() {
      const core = await client();
      const pods = await core.listNamespacedPod({ namespace: namespace!, labelSelector: selector });
      return readyPodUrls(pods.items, scheme, port);
    },
  };
}

/** The parts of a Pod discovery reads. */
export interface Pod {
  metadata?: { name?: string; deletionTimestamp?: unknown };
  status?: { podIP?: string; phase?: string; conditions?: Array<{ type: string; status: string }> };
}

/** Running, Ready, not being deleted (a Pod that terminates drains: it takes no creates). */
export function readyPodUrls(pods: Pod[], scheme: string, port: number): string[] {
  return pods
    .filter((p) => !p.metadata?.deletionTimestamp && p.status?.phase === "Running" && p.status.podIP && p.status.conditions?.some((c) => c.type === "Ready" && c.status === "True"))
    .map((p) => `${scheme}://${p.status!.podIP!.includes(":") ? `[${p.status!.podIP}]` : p.status!.podIP}:${port}`);
}
