// 07-network.mjs: a warmup that installs a package from a package index, with egress allowed
// to that index only; the VMs then run it with no network at all.
//
// A VM has no network device. With `network: { allow: [...] }` the agent listens on the guest's
// 127.0.0.1:3128 and every process gets http_proxy/https_proxy pointing there; each connection
// is carried to a proxy in this process, which lets through only what `allow` names. Here the
// "outside world" is a tiny package index served by this script on the host's loopback, under
// the name pkgs.internal (`hosts` maps it to 127.0.0.1; a name that resolves to a private or
// loopback address also needs that IP in `allow`, so a DNS name cannot reach the host's own
// services by accident).
//
//   node examples/07-network.mjs
import { createHash } from "node:crypto";
import { createServer } from "node:http";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Image } from "supermachine";

// The package: one shell script, listed in the index with its checksum.
const tool = '#!/bin/sh\necho "greet 1.0: hello, ${1:-world}"\n';
const index = { greet: { version: "1.0", url: "/files/greet-1.0.sh", sha256: createHash("sha256").update(tool).digest("hex") } };
let requests = 0;
const server = createServer((req, res) => {
  requests++;
  if (req.url === "/index/greet") return res.end(`${index.greet.version} ${index.greet.url} ${index.greet.sha256}\n`);
  if (req.url === index.greet.url) return res.end(tool);
  res.statusCode = 404;
  res.end("no such package\n");
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const port = server.address().port;
const index_ = `http://pkgs.internal:${port}`;

// A fresh snapshots directory, so the warmup runs (a cached bake would not fetch anything).
const snapshotsDir = mkdtempSync(join(tmpdir(), "supermachine-example-"));
try {
  const image = await Image.build({
    ref: "builtin:busybox",
    snapshotsDir,
    // Only the index, by name and by the loopback address it resolves to.
    network: { allow: [`pkgs.internal:${port}`, `127.0.0.1:${port}`], hosts: { "pkgs.internal": "127.0.0.1" } },
    warmup: async (vm) => {
      const script = [
        "set -e",
        `set -- $(wget -q -O - ${index_}/index/greet)`, // version, path, sha256
        `wget -q -O /tmp/greet ${index_}$2`,
        'echo "$3  /tmp/greet" | sha256sum -c -s',
        "mkdir -p /usr/local/bin && cp /tmp/greet /usr/local/bin/greet && chmod 0755 /usr/local/bin/greet",
        'echo "installed greet $1"',
      ].join("\n");
      const r = await vm.exec({ argv: ["sh", "-c", script], timeoutMs: 60_000 });
      if (r.exitCode !== 0) throw new Error(`install failed: ${r.stderr}`);
      console.log(`warmup: ${r.stdout.toString().trim()} from ${index_} (${requests} requests)`);
      // Anything else is refused by the host's proxy, with a reason.
      const other = await vm.exec({ argv: ["wget", "-q", "-O", "-", "http://example.com/"], timeoutMs: 30_000 });
      console.log(`warmup: http://example.com/ -> ${/403/.test(other.stderr.toString()) ? "403 (not in network.allow)" : `exit ${other.exitCode}`}`);
    },
  });

  // Pools default to network: "none": the VMs run what the warmup installed, and reach nothing.
  const pool = await image.pool({ min: 1, max: 1 });
  const vm = await pool.acquire();
  try {
    const r = await vm.exec({ argv: ["greet", "sandbox"] });
    console.log(`in the VM: ${r.stdout.toString().trim()}`);
    const seen = requests;
    const offline = await vm.exec({ argv: ["wget", "-q", "-T", "5", "-O", "-", `${index_}/index/greet`], timeoutMs: 30_000 });
    console.log(`in the VM, the index is ${offline.exitCode === 0 ? "reachable" : "unreachable"} (network: "none"; ${requests - seen} new requests)`);
    console.log(`netStats: ${JSON.stringify(vm.netStats())}`);
  } finally {
    await vm.release();
    await pool.shutdown();
  }
} finally {
  server.close();
  rmSync(snapshotsDir, { recursive: true, force: true });
}
