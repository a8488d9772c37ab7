// The front's parts that need no VM: placement by power of K with cache affinity, the routing of
// each request from its path and headers, node ids and tokens carrying the node's tag, and node
// discovery from a list, DNS and the Kubernetes API (the official client against an HTTP server
// that answers as the API server does for a pod list).
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parseNodes, readyPodUrls } from "../../src/server/front/discovery.js";
import { placementOrder, type NodeView } from "../../src/server/front/placement.js";
import { classify, createTarget } from "../../src/server/front/routes.js";
import type { NodeReport } from "../../src/server/node.js";
import { newNodeTag, tagOf } from "../../src/server/node-tag.js";
import { newAccessToken, newSandboxId } from "../../src/server/sandboxes.js";

function view(name: string, o: { sandboxes?: number; capacity?: number; cpu?: number; pool?: "open" | "closed" | "failed" | null; state?: NodeReport["state"]; identity?: string } = {}): NodeView {
  const pools = o.pool === null ? [] : [{ name: "base", image: "box", key: o.pool === "open" ? "k1" : null, state: o.pool ?? "closed", idle: 0, inUse: 0, max: 10, ...(o.pool === "failed" ? { error: { code: "SNAPSHOT_HOST_MISMATCH", message: "cpu differs" } } : {}) }];
  return {
    url: `http://${name}`,
    inflight: 0,
    report: {
      node: { name, tag: name.padEnd(6, "x").slice(0, 6), version: "0", startedAt: "" },
      state: o.state ?? "ready",
      identity: { qemu: o.identity ?? "7.2", machine: "microvm", accel: "tcg", cpu: "max", kernelKey: "k", agentKey: "a", agentVersion: "1" },
      load: { sandboxes: o.sandboxes ?? 0, creating: 0, capacity: o.capacity ?? 100, cpu: o.cpu ?? 0, cores: 2, memory: { totalMib: 1, availableMib: 1 } },
      pools,
      keys: o.pool === "open" ? ["k1"] : [],
    },
  };
}

const names = (order: { view: NodeView }[]) => order.map((s) => s.view.report.node.name);

describe("placement", () => {
  it("prefers the node that holds the pool's snapshot, until its load outweighs the affinity", () => {
    const warm = view("warm", { pool: "open", sandboxes: 10 });
    const cold = view("cold", { sandboxes: 0 });
    expect(names(placementOrder([cold, warm], "base"))[0]).toBe("warm");
    // 30 more sandboxes out of 100 is worth more than the affinity (a quarter of capacity).
    warm.report.load.sandboxes = 30;
    expect(names(placementOrder([cold, warm], "base"))[0]).toBe("cold");
  });

  it("weighs load and CPU, and counts creates in flight that no report shows yet", () => {
    const a = view("a", { sandboxes: 5 });
    const b = view("b", { sandboxes: 10 });
    expect(names(placementOrder([a, b], "base"))[0]).toBe("a");
    a.inflight = 10;
    expect(names(placementOrder([a, b], "base"))[0]).toBe("b");
    const busy = view("busy", { cpu: 1 });
    const idle = view("idle", { cpu: 0, sandboxes: 20 });
    expect(names(placementOrder([busy, idle], "base"))[0]).toBe("idle");
  });

  it("leaves out nodes that are not ready or lack the pool; puts full ones and failed pools last", () => {
    const order = placementOrder(
      [view("drain", { state: "draining" }), view("start", { state: "starting" }), view("nopool", { pool: null }), view("full", { sandboxes: 5, capacity: 5 }), view("failed", { pool: "failed" }), view("ok", { sandboxes: 3 })],
      "base",
    );
    expect(names(order)).toEqual(["ok", ...names(order).slice(1)]);
    expect(new Set(names(order).slice(1))).toEqual(new Set(["full", "failed"]));
    expect(order.slice(1).every((s) => s.last)).toBe(true);
    expect(placementOrder([view("drain", { state: "draining" })], "base")).toEqual([]);
  });

  it("prefers, among nodes without the pool open, those of the identity of a node that has it", () => {
    const holder = view("holder", { pool: "open", identity: "7.2", sandboxes: 99, capacity: 100 });
    const same = view("same", { identity: "7.2", sandboxes: 4 });
    const other = view("other", { identity: "8.0", sandboxes: 0 });
    const order = names(placementOrder([holder, same, other], "base"));
    expect(order.indexOf("same")).toBeLessThan(order.indexOf("other"));
  });

  it("samples K = 3 nodes: a node outside the sample is tried only after them", () => {
    const views = ["a", "b", "c", "d", "e"].map((n, i) => view(n, { sandboxes: i }));
    // random() = 0.99 swaps in the last node each time: the sample is e, a, b; c and d, though
    // less loaded than e, come after it.
    const order = names(placementOrder(views, "base", () => 0.99));
    expect(order.slice(0, 3)).toEqual(["a", "b", "e"]);
    expect(order.slice(3)).toEqual(["c", "d"]);
  });
});

describe("routing", () => {
  const none = () => undefined;
  const tag = newNodeTag();
  const id = newSandboxId(tag);

  it("ids and tokens end with the node's tag", () => {
    expect(id).toMatch(/^[a-z0-9]{20}$/);
    expect(tagOf(id)).toBe(tag);
    const token = newAccessToken(tag);
    expect(token).toMatch(/^[0-9a-f]{48}[a-z0-9]{6}$/);
    expect(tagOf(token)).toBe(tag);
    expect(tagOf("short")).toBeUndefined();
    expect(tagOf("../../etc/passwd")).toBeUndefined();
  });

  it("classifies creates, lists, per-sandbox requests and the rest", () => {
    expect(classify("POST", "/sandboxes", none)).toEqual({ kind: "create", api: "e2b" });
    expect(classify("POST", "/v2/sandboxes", none)).toEqual({ kind: "create", api: "e2b" });
    expect(classify("POST", "/v1/sandboxes", none)).toEqual({ kind: "create", api: "native" });
    expect(classify("GET", "/v2/sandboxes", none)).toEqual({ kind: "list", api: "e2b-paged" });
    expect(classify("GET", "/v1/snapshots", none)).toEqual({ kind: "list", api: "native", field: "snapshots" });
    for (const p of [`/sandboxes/${id}`, `/sandboxes/${id}/timeout`, `/v2/sandboxes/${id}/connect`, `/v1/sandboxes/${id}/files/stat`, `/v1/snapshots/${id}`]) {
      expect(classify("GET", p, none)).toEqual({ kind: "tag", tag, id });
    }
    const headers: Record<string, string> = { "e2b-sandbox-id": id };
    expect(classify("POST", "/process.Process/Start", (n) => headers[n])).toEqual({ kind: "tag", tag, id });
    // Old SDKs send only the access token.
    const token = newAccessToken(tag);
    expect(classify("GET", "/files", (n) => (n === "x-access-token" ? token : undefined))).toEqual({ kind: "tag", tag, id: undefined });
    expect(classify("GET", "/health", none)).toEqual({ kind: "any" });
    expect(classify("GET", "/v1/pools", none)).toEqual({ kind: "any" });
  });

  it("reads the pool or snapshot a create names", () => {
    expect(createTarget("e2b", { templateID: "base" })).toEqual({ pool: "base" });
    expect(createTarget("native", { pool: "base" })).toEqual({ pool: "base" });
    expect(createTarget("native", { snapshot: id })).toEqual({ snapshot: id });
    expect(createTarget("native", "nonsense")).toEqual({});
  });
});

describe("discovery", () => {
  it("takes a list of host:port or URLs, and refuses what is neither", async () => {
    expect(await parseNodes("127.0.0.2:8080, 127.0.0.3:9000").nodes()).toEqual(["http://127.0.0.2:8080", "http://127.0.0.3:9000"]);
    expect(await parseNodes("https://node.example:8443").nodes()).toEqual(["https://node.example:8443"]);
    expect(() => parseNodes("node-without-port")).toThrow(/not host:port/);
    expect(() => parseNodes("dns:no-port")).toThrow(/dns:<name>:<port>/);
    expect(() => parseNodes("k8s:")).toThrow(/label selector/);
  });

  it("resolves dns: to every address of the name", async () => {
    expect(await parseNodes("dns:localhost:8080").nodes()).toContain("http://127.0.0.1:8080");
    expect(await parseNodes("dns:no-such-name.invalid:8080").nodes()).toEqual([]);
  });

  it("keeps Running, Ready pods that are not being deleted", () => {
    const pod = (ip: string, ready: boolean, extra: object = {}) => ({ metadata: { name: ip, ...extra }, status: { podIP: ip, phase: "Running", conditions: [{ type: "Ready", status: ready ? "True" : "False" }] } });
    expect(readyPodUrls([pod("10.0.0.1", true), pod("10.0.0.2", false), pod("10.0.0.3", true, { deletionTimestamp: "now" }), pod("fd00::4", true)], "http", 8080)).toEqual(["http://10.0.0.1:8080", "http://[fd00::4]:8080"]);
  });

  it("k8s: lists the pods by label through the official client, in the namespace given", async () => {
    const seen: string[] = [];
    const api = createServer((req, res) => {
      seen.push(req.url ?? "");
      res.setHeader("content-type", "application/json");
      res.end(
        JSON.stringify({
          kind: "PodList",
          apiVersion: "v1",
          metadata: {},
          items: [
            { metadata: { name: "n1" }, status: { podIP: "10.1.0.1", phase: "Running", conditions: [{ type: "Ready", status: "True" }] } },
            { metadata: { name: "n2" }, status: { podIP: "10.1.0.2", phase: "Pending", conditions: [] } },
          ],
        }),
      );
    });
    await new Promise<void>((r) => api.listen(0, "127.0.0.1", r));
    const dir = mkdtempSync(join(tmpdir(), "sm-kubeconfig-"));
    const saved = process.env.KUBECONFIG;
    try {
      const port = (api.address() as AddressInfo).port;
      writeFileSync(
        join(dir, "config"),
        `apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: "http://127.0.0.1:${port}", insecure-skip-tls-verify: true}}]\nusers: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n`,
      );
      process.env.KUBECONFIG = join(dir, "config");
      const d = parseNodes("k8s:app.kubernetes.io/name=supermachine-node", { namespace: "sandboxes", nodePort: 8081 });
      expect(await d.nodes()).toEqual(["http://10.1.0.1:8081"]);
      expect(decodeURIComponent(seen[0]!)).toBe("/api/v1/namespaces/sandboxes/pods?labelSelector=app.kubernetes.io/name=supermachine-node");
    } finally {
      if (saved === undefined) delete process.env.KUBECONFIG;
      else process.env.KUBECONFIG = saved;
      api.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
