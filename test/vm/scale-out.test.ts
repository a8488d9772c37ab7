// A fleet as an engine (Kubernetes, Nomad) would run it, played by processes: three `serve`
// nodes on 127.0.0.2, .3 and .4, each with a home of its own that starts empty, one local
// distribution registry as their snapshot cache, and two stateless fronts (`serve --front`).
// The image is baked once (as CI would) and pushed to the registry; the nodes are `--lazy
// --frozen`, so they can only import it. Through the fronts, the unchanged E2B SDK and the remote
// client create 60 sandboxes; commands and files reach each sandbox through either front. Then a
// node is killed (its sandboxes fail with SANDBOX_NODE_LOST, creates go on elsewhere, its QEMU
// processes die) and another is drained with SIGTERM (nothing new is placed there, and it exits 0
// once its sandboxes end).
import { mkdtempSync, readdirSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, ServerError, type RemotePools, type RemoteVm } from "../../src/index.js";
import { KeyStore } from "../../src/server/keys.js";
import { runtimeRoot } from "../../src/paths.js";
import type { NodeReport } from "../../src/server/node.js";
import { nodeReport } from "../../src/server/native/schemas.js";
import { tagOf } from "../../src/server/node-tag.js";
import { startRegistry, type Registry } from "../helpers/registry.js";
import { cli } from "../helpers/run.js";
import { alive, childPids, freshHome, startServe, stopAll, type FleetProcess } from "../helpers/fleet.js";

const CONFIG = `import { defineConfig, defineImage } from "supermachine/config";
export default defineConfig({
  images: { box: defineImage({ ref: "builtin:busybox" }) },
  pools: { base: { image: "box", min: 1, max: 40 } },
  cache: { trust: "unsigned" },
});
`;

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Sdk = any;

let reg: Registry;
let project: string;
let key: string;
let keysFile: string;
let cache: string;
const nodes: FleetProcess[] = [];
const fronts: FleetProcess[] = [];
const saved = { ...process.env };
let sdk: Sdk;

const report = async (n: FleetProcess): Promise<NodeReport> => nodeReport.parse(await (await fetch(`${n.url}/v1/node`)).json()) as NodeReport;
const nodeOfTag = async (tag: string | undefined): Promise<FleetProcess | undefined> => {
  for (const n of nodes) if (n.child.exitCode === null && (await report(n).catch(() => undefined))?.node.tag === tag) return n;
  return undefined;
};

beforeAll(async () => {
  project = realpathSync(mkdtempSync(join(tmpdir(), "sm-fleet-project-")));
  writeFileSync(join(project, "supermachine.config.ts"), CONFIG);
  keysFile = join(project, "keys.json");
  key = (await new KeyStore(keysFile).create({ name: "fleet" })).key;
  reg = await startRegistry("plain");
  cache = `${reg.host}/fleet`;
  // CI's part: bake once and push the snapshot to the cache.
  const built = await cli(["build", "--cache-to", cache], { cwd: project, timeout: 600_000 });
  expect(built.status, built.stderr).toBe(0);
  for (const [i, host] of ["127.0.0.2", "127.0.0.3", "127.0.0.4"].entries()) {
    const home = freshHome(`n${i + 1}`);
    nodes.push(
      await startServe(`n${i + 1}`, ["--listen", `${host}:0`, "--keys", keysFile, "--lazy", "--frozen", "--cache-from", cache, "--node-name", `n${i + 1}`, "--capacity", "30", "--drain-grace", "600"], {
        cwd: project,
        home,
      }),
    );
  }
  const list = nodes.map((n) => new URL(n.url).host).join(",");
  for (const name of ["front-a", "front-b"]) fronts.push(await startServe(name, ["--front", "--listen", "127.0.0.1:0", "--nodes", list], { cwd: project, until: "listening" }));
  process.env.E2B_API_KEY = key;
  sdk = await import("e2b");
}, 900_000);

afterAll(async () => {
  for (const k of ["E2B_API_KEY"]) {
    if (saved[k] === undefined) delete process.env[k];
    else process.env[k] = saved[k];
  }
  await stopAll([...fronts, ...nodes]);
  await reg?.stop();
  if (project) rmSync(project, { recursive: true, force: true });
});

/** The E2B SDK's options for one front (what E2B_API_URL and E2B_SANDBOX_URL would say). */
const via = (front: FleetProcess) => ({ apiUrl: front.url, sandboxUrl: front.url, apiKey: key });

describe("a fleet of three nodes behind two fronts", () => {
  const e2bSandboxes: Sdk[] = [];
  const remoteVms: RemoteVm[] = [];
  let pools: RemotePools[] = [];

  it("creates 60 sandboxes through the fronts, spread over the nodes, each node importing the snapshot", async () => {
    pools = await Promise.all(fronts.map((f) => connect(f.url, { apiKey: key })));
    // Six at a time, alternating SDK and front.
    for (let batch = 0; batch < 10; batch++) {
      await Promise.all(
        [0, 1, 2, 3, 4, 5].map(async (j) => {
          const i = batch * 6 + j;
          const front = fronts[i % 2]!;
          if (j % 2 === 0) e2bSandboxes.push(await sdk.Sandbox.create("base", { ...via(front), metadata: { n: String(i) }, timeoutMs: 600_000 }));
          else remoteVms.push(await pools[i % 2]!.base!.acquire());
        }),
      );
    }
    expect(e2bSandboxes.length + remoteVms.length).toBe(60);
    const ids = [...e2bSandboxes.map((s) => s.sandboxId as string), ...remoteVms.map((v) => v.id)];
    expect(new Set(ids).size).toBe(60);

    const reports = await Promise.all(nodes.map(report));
    const byTag = new Map(reports.map((r) => [r.node.tag, r]));
    const perNode = new Map<string, number>();
    for (const id of ids) perNode.set(tagOf(id)!, (perNode.get(tagOf(id)!) ?? 0) + 1);
    // Every id names a node of the fleet, and each node holds what the ids say.
    for (const [tag, n] of perNode) expect(byTag.get(tag)?.load.sandboxes).toBe(n);
    // The policy spreads them: affinity keeps the first node busy for a while, the load term
    // (capacity 30) sends the rest elsewhere; no node goes past its capacity.
    expect(perNode.size).toBe(3);
    for (const n of perNode.values()) expect(n).toBeLessThanOrEqual(30);
    // Each node imported the image from the cache (it could not bake: --frozen).
    for (const r of reports) {
      const pool = r.pools.find((p) => p.name === "base")!;
      expect(pool.state).toBe("open");
      expect(pool.origin).toBe("imported");
      expect(r.keys).toEqual([pool.key]);
    }
    // The same key everywhere: one identity, one snapshot.
    expect(new Set(reports.map((r) => r.keys[0])).size).toBe(1);
  }, 900_000);

  it("routes commands and files of every sandbox to its node through either front", async () => {
    await Promise.all(
      e2bSandboxes.map(async (sb, i) => {
        const other = fronts[(i + 1) % 2]!;
        await sb.files.write("/tmp/who", sb.sandboxId);
        const again = await sdk.Sandbox.connect(sb.sandboxId, via(other));
        expect(await again.files.read("/tmp/who")).toBe(sb.sandboxId);
        const r = await again.commands.run("cat /tmp/who; echo; hostname");
        expect(r.stdout.split("\n")[0]).toBe(sb.sandboxId);
      }),
    );
    await Promise.all(
      remoteVms.map(async (vm, i) => {
        await vm.writeFile("/tmp/who", vm.id);
        // The same sandbox through the other front's native API.
        const res = await fetch(`${fronts[(i + 1) % 2]!.url}/v1/sandboxes/${vm.id}/exec`, {
          method: "POST",
          headers: { "x-api-key": key, "content-type": "application/json" },
          body: JSON.stringify({ argv: ["cat", "/tmp/who"] }),
        });
        expect(res.status).toBe(200);
        expect(Buffer.from(((await res.json()) as { stdout: string }).stdout, "base64").toString()).toBe(vm.id);
      }),
    );
    // WebSockets (spawn) pass through the front to the node, with flow control: 8 MiB nobody reads
    // at first holds the guest back, then all of it arrives.
    const vm = remoteVms[1]!;
    const flood = await vm.spawn({ argv: ["sh", "-c", "head -c 8388608 /dev/zero; echo done >&2"] });
    await new Promise((r) => setTimeout(r, 1_000));
    expect(flood.exited).toBe(false);
    let got = 0;
    for await (const c of flood.stdout) got += (c as Buffer).length;
    expect(got).toBe(8 * 1024 * 1024);
    expect((await flood.readStderr()).toString()).toBe("done\n");
    expect((await flood.wait()).exitCode).toBe(0);
    // Lists merge every node's sandboxes (E2B's, paged, through either front).
    const listed = await sdk.Sandbox.list({ ...via(fronts[1]!) }).nextItems();
    expect(listed.length).toBeGreaterThanOrEqual(30);
  }, 600_000);

  it("a node of another host identity refuses the snapshot by name, and a front then places on a matching node", async () => {
    // Another CPU model (a real difference under TCG too): its key differs, the cache has the
    // image only for the identity it was baked on, and the node says so.
    const odd = await startServe("n-odd", ["--listen", "127.0.0.5:0", "--keys", keysFile, "--lazy", "--frozen", "--cache-from", cache, "--node-name", "n-odd"], {
      cwd: project,
      home: freshHome("odd"),
      env: { SUPERMACHINE_CPU: "qemu64" },
    });
    nodes.push(odd);
    const direct = await fetch(`${odd.url}/v1/sandboxes`, { method: "POST", headers: { "x-api-key": key, "content-type": "application/json" }, body: JSON.stringify({ pool: "base" }) });
    const body = (await direct.json()) as { errorCode: string; message: string };
    expect(direct.status).toBeGreaterThanOrEqual(500);
    expect(body.errorCode).toBe("SNAPSHOT_HOST_MISMATCH");
    expect(body.message).toMatch(/cpu: the snapshot's is "max", this host's is "qemu64"/);
    const pool = (await report(odd)).pools.find((p) => p.name === "base")!;
    expect(pool.state).toBe("failed");
    expect(pool.error?.code).toBe("SNAPSHOT_HOST_MISMATCH");
    expect((await report(odd)).identity?.cpu).toBe("qemu64");
    // A front that knows it and one good node: every create lands on the good node.
    const good = nodes[1]!;
    const third = await startServe("front-c", ["--front", "--listen", "127.0.0.1:0", "--nodes", `${new URL(odd.url).host},${new URL(good.url).host}`], { cwd: project, until: "listening" });
    fronts.push(third);
    const goodTag = (await report(good)).node.tag;
    const remote = await connect(third.url, { apiKey: key });
    try {
      const vms = await Promise.all([0, 1, 2, 3].map(() => remote.base!.acquire()));
      for (const vm of vms) expect(tagOf(vm.id)).toBe(goodTag);
      await Promise.all(vms.map((vm) => vm.release()));
    } finally {
      await remote.close();
    }
    await stopAll([third, odd]);
    fronts.splice(fronts.indexOf(third), 1);
    nodes.splice(nodes.indexOf(odd), 1);
  }, 300_000);

  it("a node killed with -9: its sandboxes fail with SANDBOX_NODE_LOST, creates go on elsewhere within 5 s, its QEMUs die", async () => {
    const victimVm = remoteVms[0]!;
    const victim = (await nodeOfTag(tagOf(victimVm.id)))!;
    const victimTag = tagOf(victimVm.id)!;
    const qemus = await childPids(victim.child.pid!);
    expect(qemus.length).toBeGreaterThan(0);
    victim.child.kill("SIGKILL");
    const t0 = Date.now();
    // Creates through both fronts succeed, on the other nodes, within 5 s of the kill.
    let placed: RemoteVm | undefined;
    while (!placed && Date.now() - t0 < 5_000) placed = await pools[1]!.base!.acquire().catch(() => undefined);
    expect(placed, "a create succeeded within 5 s").toBeDefined();
    expect(tagOf(placed!.id)).not.toBe(victimTag);
    const sbx = await sdk.Sandbox.create("base", { ...via(fronts[0]!), timeoutMs: 60_000 });
    expect(tagOf(sbx.sandboxId)).not.toBe(victimTag);
    await Promise.all([placed!.release(), sbx.kill()]);

    const lost = await victimVm.exec({ argv: ["true"] }).catch((e: unknown) => e);
    expect(lost).toBeInstanceOf(ServerError);
    expect((lost as ServerError).code).toBe("SANDBOX_NODE_LOST");
    expect((lost as ServerError).message).toContain("n");
    const e2bLost = e2bSandboxes.find((s) => tagOf(s.sandboxId) === victimTag);
    if (e2bLost) {
      // The SDK reads Connect's `unavailable` as its own "not running" error, as for a sandbox
      // that E2B's proxy no longer finds; its control plane passes the front's message on.
      const err = await e2bLost.commands.run("true").catch((e: unknown) => e);
      expect(String((err as Error).message)).toMatch(/not running/);
      const info = await sdk.Sandbox.getInfo(e2bLost.sandboxId, via(fronts[1]!)).catch((e: unknown) => e);
      expect(String((info as Error).message)).toContain("SANDBOX_NODE_LOST");
    }
    // No QEMU of the dead node is left.
    const deadline = Date.now() + 10_000;
    while (qemus.some(alive) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    expect(qemus.filter(alive)).toEqual([]);

    // The engine restarts it (same address, same home): a new process, a new tag. Ids of the old
    // one are lost for good (not routed to the new process), and the runtime directories the
    // killed process could not remove are swept when the new one starts its first VM.
    const stale = readdirSync(runtimeRoot()).filter((n) => n.startsWith(`sm-${victim.child.pid}-`));
    expect(stale.length).toBeGreaterThan(0);
    const idx = nodes.indexOf(victim);
    const restarted = await startServe(`${victim.name}-restarted`, ["--listen", new URL(victim.url).host, "--keys", keysFile, "--lazy", "--frozen", "--cache-from", cache, "--node-name", victim.name, "--capacity", "30", "--drain-grace", "600"], { cwd: project, home: victim.home! });
    nodes[idx] = restarted;
    expect((await report(restarted)).node.tag).not.toBe(victimTag);
    const direct = await fetch(`${restarted.url}/v1/sandboxes`, { method: "POST", headers: { "x-api-key": key, "content-type": "application/json" }, body: JSON.stringify({ pool: "base" }) });
    expect(direct.status).toBe(201);
    const fresh = (await direct.json()) as { id: string };
    await pools[0]!.base!.refreshStats();
    const stillLost = await victimVm.exec({ argv: ["true"] }).catch((e: unknown) => e);
    expect((stillLost as ServerError).code).toBe("SANDBOX_NODE_LOST");
    expect(readdirSync(runtimeRoot()).filter((n) => stale.includes(n))).toEqual([]);
    await fetch(`${fronts[0]!.url}/v1/sandboxes/${fresh.id}`, { method: "DELETE", headers: { "x-api-key": key } });
    for (let i = remoteVms.length - 1; i >= 0; i--) if (tagOf(remoteVms[i]!.id) === victimTag) remoteVms.splice(i, 1);
    for (let i = e2bSandboxes.length - 1; i >= 0; i--) if (tagOf(e2bSandboxes[i]!.sandboxId) === victimTag) e2bSandboxes.splice(i, 1);
  }, 300_000);

  it("a node sent SIGTERM: it says draining at once, nothing new is placed there, and it exits 0 when its sandboxes end", async () => {
    // A node that holds sandboxes from the first test.
    const draining = (await nodeOfTag(tagOf(remoteVms[remoteVms.length - 1]!.id)))!;
    const tag = (await report(draining)).node.tag;
    draining.child.kill("SIGTERM");
    const until = Date.now() + 5_000;
    while ((await report(draining)).state !== "draining" && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    expect((await report(draining)).state).toBe("draining");
    // Creates right after the signal land on the other node, through both fronts.
    const made = await Promise.all([0, 1, 2, 3].map((i) => pools[i % 2]!.base!.acquire()));
    for (const vm of made) expect(tagOf(vm.id)).not.toBe(tag);
    await Promise.all(made.map((vm) => vm.release()));
    // Its sandboxes still work while it drains; then they end and it exits 0.
    const mine = [...remoteVms.filter((v) => tagOf(v.id) === tag), ...e2bSandboxes.filter((s) => tagOf(s.sandboxId) === tag)];
    expect(mine.length).toBeGreaterThan(0);
    await Promise.all(mine.map((s) => ("sandboxId" in s ? s.commands.run("true") : (s as RemoteVm).exec({ argv: ["true"] }))));
    expect(draining.child.exitCode).toBeNull();
    await Promise.all(mine.map((s) => ("sandboxId" in s ? s.kill() : (s as RemoteVm).release())));
    const exit = await draining.exited;
    expect(exit).toEqual({ code: 0, signal: null });
  }, 300_000);

  afterAll(async () => {
    await Promise.all(pools.map((p) => p.close().catch(() => {})));
    await Promise.all(e2bSandboxes.map((s) => s.kill().catch(() => {})));
  });
});
