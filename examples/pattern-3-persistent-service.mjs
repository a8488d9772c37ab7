// pattern-3-persistent-service.mjs: bake a snapshot with the service already listening.
// The workload (`cmd`) writes a page saying when it started and runs busybox httpd on port 8080.
// With `listenerRequired: true` the bake waits until something listens on `guestPort` and
// captures the VM then, so every VM restored from the snapshot is serving from its first
// instant: the server is not started again, which the page (written once, at start) shows.
//
//   node examples/pattern-3-persistent-service.mjs
import { Image, connect } from "supermachine";

const local = () => Image.build({
  ref: "builtin:busybox",
  name: "example-persistent-httpd", // a rebake replaces this snapshot instead of adding one
  cmd: [
    "sh",
    "-c",
    'mkdir -p /www && echo "started $(date -u +%T) UTC, instance $(head -c 4 /dev/urandom | od -An -tx1 | tr -d " \\n")" > /www/index.html && exec httpd -f -p 8080 -h /www',
  ],
  guestPort: 8080,
  listenerRequired: true,
});

// With SUPERMACHINE_URL set, the "pattern3" pool of a `supermachine serve` there, declared with
// this cmd, guestPort and listenerRequired (docs/serve.md); the rest is unchanged.
const pool = process.env.SUPERMACHINE_URL ? (await connect(process.env.SUPERMACHINE_URL)).pattern3 : await (await local()).pool({ min: 2, max: 2 });
try {
  const vms = [await pool.acquire(), await pool.acquire()];
  try {
    for (const vm of vms) {
      const t0 = performance.now();
      const forwarder = await vm.exposeTcp(0, 8080);
      try {
        const res = await fetch(`http://${forwarder.localAddr}/`);
        const body = (await res.text()).trim();
        console.log(`VM ${vm.pid === undefined ? `(sandbox ${vm.id})` : `with QEMU pid ${vm.pid}`}: ${res.status} "${body}" (${Math.round(performance.now() - t0)} ms after acquire)`);
      } finally {
        await forwarder.stop();
      }
    }
  } finally {
    await Promise.all(vms.map((vm) => vm.release()));
  }
  console.log("same page in both VMs: the server started once, at bake time, and was captured running");
} finally {
  await pool.shutdown();
}
