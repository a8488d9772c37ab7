/**
 * Benchmark group `page`: what a user of the serve page meets.
 * - `page_bundle_gzip_kib`: the page's files (HTML, script, styles) as a browser downloads them,
 *   gzip-compressed.
 * - `page_load_ms`: a new tab with the key in session storage, from navigation to the sandboxes
 *   table drawn with the live sandbox in it (headless Chromium, the same as the browser tests).
 * - `page_sandbox_visible_ms`: from a create's answer (the API) to its row in the page; its peer
 *   `page_event_ms` is the same create's `sandbox created` event reaching a plain SSE client in
 *   this process, measured in the same rounds, so their difference is the page's own work.
 * - `page_images_ms`: the listing behind the graph (`GET /v1/images`: load the project, key
 *   every image by a dry run, size the snapshots) of the 20-image test project, computed afresh
 *   each time, as after every bake or watch round. Its peer is the project group's
 *   `graph_resolve_20_images_ms` (the same project resolved by `supermachine build`).
 */
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { chromium } from "playwright-core";
import { packageRoot } from "../../src/engine/artifacts.js";
import { KeyStore } from "../../src/server/keys.js";
import { startServer } from "../../src/server/index.js";
import { ProjectImages } from "../../src/server/images.js";
import { ServerEvents } from "../../src/server/events.js";
import { BuildLog } from "../../src/server/native/state.js";
import { webDir } from "../../src/server/ui.js";
import type { BenchContext, BenchGroup } from "../harness.js";

export const pageGroup: BenchGroup = {
  name: "page",
  metrics: ["page_bundle_gzip_kib", "page_load_ms", "page_sandbox_visible_ms", "page_event_ms", "page_images_ms"],
  run: (ctx) => pageBenchmarks(ctx),
};

const CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"];

async function pageBenchmarks(ctx: BenchContext): Promise<void> {
  const { quick, record, recordValue, progress } = ctx;
  const web = webDir();
  const files = ["index.html", "app.js", "app.css"];
  const gz = files.reduce((n, f) => n + gzipSync(readFileSync(join(web, f)), { level: 6 }).length, 0);
  recordValue("page_bundle_gzip_kib", gz / 1024, files.length, "KiB");

  const work = mkdtempSync(join(tmpdir(), "sm-bench-page-"));
  try {
    progress("page: the image listing of the 20-image project");
    const mono = join(work, "monorepo");
    cpSync(join(packageRoot(), "test/fixtures/monorepo"), mono, { recursive: true });
    const images = new ProjectImages({ cwd: mono }, new BuildLog(), new ServerEvents());
    const listing: number[] = [];
    for (let i = 0; i < (quick ? 3 : 15) + 1; i++) {
      images.invalidate();
      const t0 = performance.now();
      const r = await images.list();
      const ms = performance.now() - t0;
      if (r.images.length !== 20) throw new Error(`the listing has ${r.images.length} images, not 20`);
      if (i > 0) listing.push(ms); // the first one fills jiti's cache
    }
    record("page_images_ms", listing);

    progress("page: a server and a browser");
    writeFileSync(
      join(work, "supermachine.config.ts"),
      `import { defineConfig, defineImage } from "supermachine/config";
export default defineConfig({ images: { box: defineImage({ ref: "builtin:busybox" }) }, pools: { box: { image: "box", min: 2, max: 4 } } });
`,
    );
    const keys = new KeyStore(join(work, "keys.json"));
    const { key } = await keys.create({ name: "bench" });
    const server = await startServer({ cwd: work, listen: "127.0.0.1:0", keys: keys.path, logLevel: "silent" });
    const profile = mkdtempSync(join(tmpdir(), "sm-bench-chromium-"));
    const browser = await chromium.launchPersistentContext(profile, { executablePath: process.env.SUPERMACHINE_TEST_CHROMIUM ?? "/usr/bin/chromium", headless: true, args: CHROMIUM_FLAGS, viewport: { width: 1280, height: 800 } });
    try {
      await server.ready;
      const api = (path: string, init: RequestInit = {}) => fetch(`${server.url}${path}`, { ...init, headers: { "x-api-key": key, ...(init.body ? { "content-type": "application/json" } : {}) } });
      const create = async () => ((await (await api("/v1/sandboxes", { method: "POST", body: JSON.stringify({ pool: "box" }) })).json()) as { id: string }).id;

      // A plain SSE client: when each sandbox's created event arrives.
      const arrived = new Map<string, number>();
      const ctl = new AbortController();
      const feed = await fetch(`${server.url}/v1/events`, { headers: { "x-api-key": key }, signal: ctl.signal });
      void (async () => {
        let buf = "";
        try {
          for await (const chunk of feed.body as unknown as AsyncIterable<Uint8Array>) {
            const now = performance.now();
            buf += Buffer.from(chunk).toString("utf8");
            let end;
            while ((end = buf.indexOf("\n\n")) >= 0) {
              const data = buf.slice(0, end).split("\n").find((l) => l.startsWith("data: "));
              buf = buf.slice(end + 2);
              if (!data) continue;
              const e = JSON.parse(data.slice(6)) as { kind: string; type: string; sandbox?: string };
              if (e.kind === "sandbox" && e.type === "created" && e.sandbox) arrived.set(e.sandbox, now);
            }
          }
        } catch {
          // aborted at the end
        }
      })();

      const page = await browser.newPage();
      await page.goto(`${server.url}/#sandboxes`);
      await page.getByLabel("API key").fill(key);
      await page.getByLabel("API key").press("Enter");
      await page.locator("nav").waitFor();

      const visible: number[] = [];
      const events: number[] = [];
      const rounds = quick ? 5 : 30;
      for (let i = 0; i < rounds + 2; i++) {
        const id = await create();
        const t0 = performance.now();
        await page.locator(`[data-sandbox-id="${id}"]`).waitFor({ timeout: 10_000 });
        const shown = performance.now() - t0;
        const until = Date.now() + 5_000;
        while (!arrived.has(id) && Date.now() < until) await new Promise((r) => setTimeout(r, 5));
        if (!arrived.has(id)) throw new Error(`the created event of ${id} never reached the SSE client`);
        // The event may arrive before the create's answer is read: that is 0 ms after it.
        if (i >= 2) {
          visible.push(shown);
          events.push(Math.max(0, arrived.get(id)! - t0));
        }
        await api(`/v1/sandboxes/${id}`, { method: "DELETE" });
        await page.locator(`[data-sandbox-id="${id}"]`).waitFor({ state: "detached", timeout: 10_000 });
      }
      record("page_sandbox_visible_ms", visible);
      record("page_event_ms", events);

      progress("page: loading the page");
      const live = await create();
      const loads: number[] = [];
      for (let i = 0; i < (quick ? 3 : 10) + 1; i++) {
        const tab = await browser.newPage();
        // The key as a signed-in tab has it: in the tab's session storage before the page's script runs.
        await tab.addInitScript((k) => (globalThis as unknown as { sessionStorage: { setItem(name: string, value: string): void } }).sessionStorage.setItem("supermachine.apiKey", k), key);
        const t0 = performance.now();
        await tab.goto(`${server.url}/#sandboxes`);
        await tab.locator(`[data-sandbox-id="${live}"]`).waitFor({ timeout: 10_000 });
        if (i > 0) loads.push(performance.now() - t0);
        await tab.close();
      }
      record("page_load_ms", loads);
      ctl.abort();
    } finally {
      await browser.close().catch(() => {});
      rmSync(profile, { recursive: true, force: true });
      await server.close();
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}
