/**
 * `supermachine serve`: a project's pools over HTTP (the E2B-compatible API), until SIGTERM or
 * SIGINT, which drain it: no new sandboxes, live ones get `--drain-grace` seconds, then they are
 * released and the process exits 0. `supermachine keys create|list|revoke` manages its API keys.
 */
import type { Command } from "commander";
import { KeyStore, startServer, type KeyRecord } from "../server/index.js";
import { action, integer, isJson, writeJson } from "./common.js";

interface ServeCliOptions {
  config?: string;
  listen: string;
  keys?: string;
  cacheFrom?: string;
  watch?: boolean;
  frozen?: boolean;
  tlsCert?: string;
  tlsKey?: string;
  drainGrace: number;
  maxTimeout?: number;
  logLevel: string;
  allowSandboxNetwork?: boolean;
  lazy?: boolean;
  bakeOnDemand?: boolean;
  nodeName?: string;
  capacity?: number;
  front?: boolean;
  nodes?: string;
  nodePort: number;
  namespace?: string;
}

export function registerServeCommands(program: Command): void {
  program
    .command("serve")
    .helpGroup("Serving:")
    .summary("serve the project's pools over HTTP (E2B-compatible)")
    .description(
      "Load the project (like loadPools) and serve its pools: sandboxes for any process, language or host, " +
        "through the E2B SDKs (E2B_API_URL and E2B_SANDBOX_URL set to this server) or plain HTTP. " +
        "Every request needs a key from `supermachine keys create`. Logs are JSON lines on stderr. " +
        "SIGTERM drains: no new sandboxes, live ones get the grace period, then the server exits 0.",
    )
    .option("-c, --config <file>", "the project's config file (default: supermachine.config.{ts,mts,js,mjs} here or above)")
    .option("--listen <host:port>", "where to listen (loopback by default; port 0 picks one)", "127.0.0.1:8080")
    .option("--keys <file>", "the API key file (default: $SUPERMACHINE_HOME/server/keys.json)")
    .option("--cache-from <location>", "a snapshot cache to import the images from before baking (default: the config's cache.from)")
    .option("--watch", "rebake images as their files change; new sandboxes get the new snapshots")
    .option("--frozen", "bake nothing: fail when an image is not baked or a tag is not pinned")
    .option("--tls-cert <file>", "serve HTTPS with this PEM certificate (with --tls-key)")
    .option("--tls-key <file>", "the certificate's PEM private key")
    .option("--drain-grace <seconds>", "on SIGTERM, how long live sandboxes may run on before they are released", integer, 30)
    .option("--max-timeout <seconds>", "the longest life a client may give a sandbox (default 86400)", integer)
    .option("--allow-sandbox-network", "let creates give their sandbox egress of its own (`network`), on pools without one")
    .option("--log-level <level>", "fatal, error, warn, info, debug, trace or silent", "info")
    .option("--lazy", "open each pool on its first create, importing its snapshot from the cache (a node of a fleet)")
    .option("--bake-on-demand", "with --lazy: bake an image neither here nor in the cache in the create that needs it")
    .option("--node-name <name>", "this node's name in a fleet (default: the hostname)")
    .option("--capacity <n>", "the most sandboxes this node holds; creates past it are refused so a front places them elsewhere", integer)
    .option("--front", "be a stateless front for a fleet of serve nodes (with --nodes): place creates, route the rest")
    .option("--nodes <spec>", "with --front: host:port[,host:port...], dns:<name>:<port> or k8s:<label selector>")
    .option("--node-port <port>", "with --front --nodes k8s:...: the nodes' port", integer, 8080)
    .option("--namespace <name>", "with --front --nodes k8s:...: the nodes' namespace (default: the front's own)")
    .action(action(serve));

  const keys = program.command("keys").helpGroup("Serving:").summary("manage the API keys of `supermachine serve`").description("Create, list and revoke the API keys `supermachine serve` accepts. Only a hash of each key is stored.");
  keys
    .command("create")
    .summary("make a key (printed once)")
    .option("--name <name>", "what the key is for", "default")
    .option("--max-sandboxes <n>", "sandboxes alive at once with this key (default: no limit)", integer)
    .option("--keys <file>", "the API key file (default: $SUPERMACHINE_HOME/server/keys.json)")
    .action(
      action(async (o: { name: string; maxSandboxes?: number; keys?: string }, cmd: Command) => {
        const store = new KeyStore(o.keys);
        const { key, record } = await store.create({ name: o.name, ...(o.maxSandboxes !== undefined ? { maxSandboxes: o.maxSandboxes } : {}) });
        if (isJson(cmd)) writeJson({ key, ...publicRecord(record), file: store.path });
        else {
          process.stdout.write(`${key}\n`);
          process.stderr.write(`key ${record.id} (${record.name}) stored as a hash in ${store.path}; it is shown only now\n`);
        }
        return 0;
      }),
    );
  keys
    .command("list")
    .summary("list keys (never their secrets)")
    .option("--keys <file>", "the API key file (default: $SUPERMACHINE_HOME/server/keys.json)")
    .action(
      action(async (o: { keys?: string }, cmd: Command) => {
        const store = new KeyStore(o.keys);
        const all = store.list();
        if (isJson(cmd)) writeJson(all.map(publicRecord));
        else if (all.length === 0) process.stdout.write(`no keys in ${store.path}; make one with \`supermachine keys create\`\n`);
        else for (const k of all) process.stdout.write(`${k.id}  ${k.prefix}…  ${k.name}  ${k.maxSandboxes === undefined ? "no limit" : `max ${k.maxSandboxes} sandboxes`}  ${k.revokedAt ? `revoked ${k.revokedAt}` : `created ${k.createdAt}`}\n`);
        return 0;
      }),
    );
  keys
    .command("revoke")
    .summary("revoke a key by id, name or prefix")
    .argument("<key>", "the key's id, name or prefix (from `keys list`)")
    .option("--keys <file>", "the API key file (default: $SUPERMACHINE_HOME/server/keys.json)")
    .action(
      action(async (which: string, o: { keys?: string }, cmd: Command) => {
        const record = await new KeyStore(o.keys).revoke(which);
        if (isJson(cmd)) writeJson(publicRecord(record));
        else process.stdout.write(`revoked ${record.id} (${record.name}); a running server refuses it from now on\n`);
        return 0;
      }),
    );
}

const publicRecord = (k: KeyRecord) => ({ id: k.id, name: k.name, prefix: k.prefix, maxSandboxes: k.maxSandboxes ?? null, createdAt: k.createdAt, revokedAt: k.revokedAt ?? null });

async function serve(o: ServeCliOptions, cmd: Command): Promise<number> {
  if ((o.tlsCert === undefined) !== (o.tlsKey === undefined)) {
    process.stderr.write("supermachine serve: --tls-cert and --tls-key go together\n");
    return 2;
  }
  const json = isJson(cmd);
  if (o.front) return front(o, json);
  if (o.nodes) {
    process.stderr.write("supermachine serve: --nodes goes with --front\n");
    return 2;
  }
  const server = await startServer({
    listen: o.listen,
    ...(o.config ? { config: o.config } : {}),
    ...(o.keys ? { keys: o.keys } : {}),
    ...(o.cacheFrom ? { cacheFrom: o.cacheFrom } : {}),
    ...(o.watch ? { watch: true } : {}),
    ...(o.frozen ? { frozen: true } : {}),
    ...(o.tlsCert && o.tlsKey ? { tls: { cert: o.tlsCert, key: o.tlsKey } } : {}),
    ...(o.maxTimeout !== undefined ? { maxTimeoutMs: o.maxTimeout * 1000 } : {}),
    logLevel: o.logLevel,
    ...(o.allowSandboxNetwork ? { allowSandboxNetwork: true } : {}),
    ...(o.lazy ? { lazy: true } : {}),
    ...(o.bakeOnDemand ? { bakeOnDemand: true } : {}),
    ...(o.nodeName ? { nodeName: o.nodeName } : {}),
    ...(o.capacity !== undefined ? { capacity: o.capacity } : {}),
  });
  let signalled = false;
  const stopped = new Promise<number>((resolve) => {
    const stop = (sig: NodeJS.Signals) => {
      if (signalled) return;
      signalled = true;
      process.stderr.write(`supermachine serve: ${sig}: draining (up to ${o.drainGrace} s)\n`);
      server.drain(o.drainGrace * 1000).then(
        () => resolve(0),
        (err: Error) => {
          process.stderr.write(`supermachine serve: drain failed: ${err.message}\n`);
          resolve(1);
        },
      );
    };
    process.once("SIGTERM", stop);
    process.once("SIGINT", stop);
  });
  if (json) writeJson({ type: "listening", url: server.url });
  else process.stderr.write(`supermachine serve: listening on ${server.url} (loading the project)\n`);
  try {
    await server.ready;
  } catch (err) {
    if (signalled) return stopped;
    await server.close();
    throw err;
  }
  if (json) writeJson({ type: "ready", url: server.url });
  else process.stderr.write(`supermachine serve: ready on ${server.url}\n`);
  return stopped;
}

async function front(o: ServeCliOptions, json: boolean): Promise<number> {
  if (!o.nodes) {
    process.stderr.write("supermachine serve --front: give the nodes with --nodes (host:port,... | dns:<name>:<port> | k8s:<label selector>)\n");
    return 2;
  }
  const { startFront } = await import("../server/front/index.js");
  const server = await startFront({
    nodes: o.nodes,
    listen: o.listen,
    nodePort: o.nodePort,
    ...(o.namespace ? { namespace: o.namespace } : {}),
    logLevel: o.logLevel,
  });
  if (json) writeJson({ type: "listening", url: server.url, front: true });
  else process.stderr.write(`supermachine serve --front: listening on ${server.url}, ${server.nodes.all().length} nodes from ${o.nodes}\n`);
  // A front holds nothing: SIGTERM closes it at once.
  await new Promise<void>((resolve) => {
    process.once("SIGTERM", () => resolve());
    process.once("SIGINT", () => resolve());
  });
  await server.close();
  return 0;
}
