/** Helpers the benchmark groups share: memory of a process, guest set-up, TCP, waiting, the test fixtures. */
import { readFileSync } from "node:fs";
import { connect, type Socket } from "node:net";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { packageRoot } from "../src/engine/artifacts.js";
import type { Vm } from "../src/runtime/vm.js";

export const MiB = 1024 * 1024;

/** RSS and PSS of one process, from smaps_rollup (kB → MiB). */
export function memoryOf(pid: number): { rss: number; pss: number } {
  const text = readFileSync(`/proc/${pid}/smaps_rollup`, "utf8");
  const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? NaN);
  return { rss: kb("Rss") / 1024, pss: kb("Pss") / 1024 };
}

/** Where a process's memory goes (PSS, MiB), from /proc/<pid>/smaps. */
export interface MemoryBreakdown {
  /** The guest's RAM: file-backed mappings of 64 MiB or more (the snapshot's RAM file). */
  guestRam: number;
  /** Anonymous memory: TCG's translation buffer, QEMU's heap and stacks, private copies of RAM pages. */
  anonymous: number;
  /** The QEMU binary. */
  binary: number;
  /** Shared libraries. */
  libraries: number;
  /** Any other file mapping. */
  other: number;
}

export function memoryBreakdown(pid: number): MemoryBreakdown {
  const text = readFileSync(`/proc/${pid}/smaps`, "utf8");
  const out: MemoryBreakdown = { guestRam: 0, anonymous: 0, binary: 0, libraries: 0, other: 0 };
  let kind: keyof MemoryBreakdown = "anonymous";
  for (const line of text.split("\n")) {
    const head = /^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (head) {
      const path = head[3]!;
      const size = parseInt(head[2]!, 16) - parseInt(head[1]!, 16);
      kind = !path.startsWith("/") ? "anonymous" : /qemu-system/.test(path) ? "binary" : /\.so(\.|$)/.test(path) ? "libraries" : size >= 64 * MiB ? "guestRam" : "other";
      continue;
    }
    const pss = /^Pss:\s+(\d+) kB/.exec(line);
    if (pss) out[kind] += Number(pss[1]) / 1024;
  }
  return out;
}

/** Runs a shell command in the guest for a benchmark's set-up; a failure ends that benchmark. */
export async function guestSetup(v: Vm, script: string): Promise<void> {
  const r = await v.exec({ argv: ["sh", "-c", script], timeoutMs: 120_000 });
  if (r.exitCode !== 0) throw new Error(`guest set-up failed (exit ${r.exitCode}): ${script}: ${r.stderr.toString().trim()}`);
}

export function connectTcp(addr: string): Promise<Socket> {
  const [host, port] = addr.split(":");
  return new Promise((res, rej) => {
    const s = connect({ host: host!, port: Number(port) }, () => res(s));
    s.once("error", rej);
  });
}

export async function waitUntil(cond: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error("timed out waiting for a spare VM");
    await new Promise((r) => setTimeout(r, 5));
  }
}

export async function waitForHttp(url: string, ms = 15_000): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    try {
      const r = await fetch(url);
      if (r.status < 500) return;
    } catch {
      /* not listening yet */
    }
    if (Date.now() > end) throw new Error(`${url} did not answer within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The test fixtures' builder (test/fixtures/build-fixtures.mjs): OCI layouts of real images, built offline. */
export async function fixtures(): Promise<{
  ensureFixtures(o: { only: string[]; log: (l: string) => void }): Promise<{ python: { ref: string; layout: string; tag: string } }>;
}> {
  return import(pathToFileURL(join(packageRoot(), "test/fixtures/build-fixtures.mjs")).href);
}

/** A registry on loopback (Debian's docker-registry), as the tests run it (test/fixtures/registry-config.mjs). */
export async function registryConfig(): Promise<{ writeRegistryConfig(o: { dir: string; port: number }): string; freePort(): Promise<number> }> {
  return import(pathToFileURL(join(packageRoot(), "test/fixtures/registry-config.mjs")).href);
}
