/**
 * The latency proxy (wan-proxy.ts) in a process of its own, for benchmarks: relaying tens of MB
 * through JavaScript costs CPU, and a proxy in the measured process would take that CPU from the
 * transfer it measures while the peer (skopeo, its own process) gets a core to itself. Run as a
 * script (`node wan-proxy-process.js <target> <delayMs>`) it prints the proxy's address and
 * serves until its stdin closes.
 */
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { startWanProxy } from "./wan-proxy.js";

export interface ProxyProcess {
  host: string;
  close(): Promise<void>;
}

export async function startWanProxyProcess(target: string, delayMs: number): Promise<ProxyProcess> {
  const child = spawn(process.execPath, [fileURLToPath(import.meta.url), target, String(delayMs)], { stdio: ["pipe", "pipe", "inherit"] });
  const host = await new Promise<string>((resolve, reject) => {
    let out = "";
    child.stdout!.on("data", (d: Buffer) => {
      out += d.toString();
      const nl = out.indexOf("\n");
      if (nl >= 0) resolve(out.slice(0, nl).trim());
    });
    child.once("exit", (code) => reject(new Error(`the latency proxy exited (${code}) before listening`)));
  });
  return {
    host,
    close: () =>
      new Promise<void>((resolve) => {
        if (child.exitCode !== null) return resolve();
        child.once("exit", () => resolve());
        child.stdin!.end();
      }),
  };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const [target, delay] = process.argv.slice(2);
  const proxy = await startWanProxy({ target: target!, delayMs: Number(delay) });
  process.stdout.write(`${proxy.host}\n`);
  process.stdin.resume();
  process.stdin.on("end", () => void proxy.close().then(() => process.exit(0)));
}
