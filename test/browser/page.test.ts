// The serve page in a real browser (Debian's headless Chromium, driven by playwright-core),
// against `supermachine serve --watch` on a copy of examples/declarative (python, and agent built
// on it with a helper module): the key gate, the graph and an image's why and bake log, a sandbox
// created through the API showing up within a second and killed from the page, a bake started by
// editing the helper showing live progress, and each view in both themes at desktop and phone
// widths, checked by axe-core and saved as screenshots (test-results/browser/, a CI artifact).
import { cpSync, mkdtempSync, readFileSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startServer, tagImage, type SupermachineServer } from "../../src/index.js";
import { KeyStore } from "../../src/server/keys.js";
// @ts-expect-error plain JavaScript helpers without types
import { ensureFixtures } from "../fixtures/build-fixtures.mjs";
import { accessibilityViolations, launchBrowser, screenshot, type TestBrowser } from "../helpers/browser.js";

const root = join(import.meta.dirname, "..", "..");
const work = realpathSync(mkdtempSync(join(tmpdir(), "sm-page-")));
const project = join(work, "declarative");
let server: SupermachineServer;
let key: string;
let browser: TestBrowser;

beforeAll(async () => {
  const { python } = await ensureFixtures({ only: ["python"], log: () => {} });
  await tagImage(python.ref, "python:3-bookworm");
  // The example as a user has it: no lock yet (the repository's is this machine's, and ignored).
  cpSync(join(root, "examples", "declarative"), project, { recursive: true, filter: (src) => !src.endsWith("supermachine.lock") });
  const keys = new KeyStore(join(work, "keys.json"));
  key = (await keys.create({ name: "page" })).key;
  server = await startServer({ cwd: project, watch: true, listen: "127.0.0.1:0", keys: keys.path, logLevel: process.env.SM_SERVE_LOG ?? "silent" });
  await server.ready;
  browser = await launchBrowser();
}, 900_000);

afterAll(async () => {
  await browser?.close();
  await server?.close();
  rmSync(work, { recursive: true, force: true });
});

const api = (path: string, init: RequestInit = {}) => fetch(`${server.url}${path}`, { ...init, headers: { "x-api-key": key, ...(init.body ? { "content-type": "application/json" } : {}), ...init.headers } });

/** A tab signed in with the key, on `view`. */
async function signedIn(view = "graph", viewport?: { width: number; height: number }): Promise<Page> {
  const page = await browser.page(viewport);
  await page.goto(`${server.url}/#${view}`);
  await page.getByLabel("API key").fill(key);
  await page.getByLabel("API key").press("Enter");
  await page.locator("nav").waitFor();
  return page;
}

describe("the key gate", () => {
  it("shows nothing but the key form without a key, refuses a wrong one, and opens with the right one", async () => {
    const page = await browser.page();
    await page.goto(server.url);
    await expect.poll(() => page.getByLabel("API key").isVisible()).toBe(true);
    expect(await page.locator("nav").count()).toBe(0);
    expect(await page.locator("[data-image]").count()).toBe(0);
    // The data behind the page needs the key too.
    expect(await page.evaluate(() => fetch("/v1/images").then((r) => r.status))).toBe(401);
    expect(await page.evaluate(() => fetch("/v1/events").then((r) => r.status))).toBe(401);

    await page.getByLabel("API key").fill(`e2b_${"0".repeat(32)}`);
    await page.getByLabel("API key").press("Enter");
    await expect.poll(() => page.getByRole("alert").textContent()).toContain("unknown or revoked");
    expect(await page.locator("nav").count()).toBe(0);

    await page.getByLabel("API key").fill(key);
    await page.getByLabel("API key").press("Enter");
    await page.locator('[data-image="agent"]').waitFor();
    await page.locator('[data-image="python"]').waitFor();
    // The header names the node and says it is ready (no "starting" or "draining").
    const node = (await (await fetch(`${server.url}/v1/node`)).json()) as { node: { name: string } };
    await expect.poll(() => page.locator("header").textContent()).toContain(node.node.name);
    expect(await page.locator("header").textContent()).not.toMatch(/starting|draining/);
    // Typed once: a reload keeps it (session storage), a new tab asks again.
    await page.reload();
    await page.locator('[data-image="agent"]').waitFor();
    const other = await browser.page();
    await other.goto(server.url);
    await expect.poll(() => other.getByLabel("API key").isVisible()).toBe(true);
    await other.close();
    // Signing out forgets it.
    await page.getByRole("button", { name: /sign out/i }).click();
    await expect.poll(() => page.getByLabel("API key").isVisible()).toBe(true);
    expect(await page.evaluate("sessionStorage.length")).toBe(0);
    await page.close();
  });

  it("sends a strict Content-Security-Policy with the page", async () => {
    const res = await fetch(server.url);
    expect(res.status).toBe(200);
    expect(res.headers.get("content-security-policy")).toContain("script-src 'self'");
    const html = await res.text();
    expect(html).not.toMatch(/<script(?![^>]*\bsrc=)[^>]*>/);
    expect(html).not.toMatch(/https?:\/\//);
  });
});

describe("the graph", () => {
  it("draws python above agent with key prefixes and sizes, and shows an image's why and bake log on click", async () => {
    const page = await signedIn("graph");
    const images = (await (await api("/v1/images")).json()) as { images: { name: string; key: string; cached: boolean }[] };
    const python = page.locator('[data-image="python"]');
    const agent = page.locator('[data-image="agent"]');
    await agent.waitFor();
    const [pb, ab] = [await python.boundingBox(), await agent.boundingBox()];
    expect(pb!.y + pb!.height).toBeLessThanOrEqual(ab!.y);
    for (const img of images.images) {
      expect(img.cached).toBe(true);
      const text = await page.locator(`[data-image="${img.name}"]`).textContent();
      expect(text).toContain(img.key.slice(0, 12));
      expect(text).toMatch(/MiB/);
    }
    await python.click();
    const details = page.getByRole("complementary", { name: "Image details" });
    await expect.poll(() => details.textContent(), { timeout: 10_000 }).toMatch(/nothing changed/i);
    await expect.poll(() => details.locator("pre").textContent(), { timeout: 10_000 }).toContain("baking");
    // By keyboard: focus agent, Enter opens it, Escape closes.
    await agent.focus();
    await page.keyboard.press("Enter");
    await expect.poll(() => details.textContent(), { timeout: 10_000 }).toContain("agent");
    await screenshot(page, "graph-details");
    await page.keyboard.press("Escape");
    await expect.poll(() => details.count()).toBe(0);
    await page.close();
  });
});

describe("sandboxes", () => {
  it("shows a sandbox created through the API within 1 s, counts its execs, and kills it after a confirm", async () => {
    const page = await signedIn("sandboxes");
    await page.getByText(/no sandboxes alive/i).waitFor();
    const created = await api("/v1/sandboxes", { method: "POST", body: JSON.stringify({ pool: "agent", metadata: { from: "browser-test" } }) });
    expect(created.status).toBe(201);
    const { id } = (await created.json()) as { id: string };
    const t0 = performance.now();
    const row = page.locator(`[data-sandbox-id="${id}"]`);
    await row.waitFor({ timeout: 5_000 });
    const shownMs = performance.now() - t0;
    expect(shownMs, `the row appeared after ${shownMs.toFixed(0)} ms`).toBeLessThan(1_000);
    expect(await row.textContent()).toContain("agent");

    for (let i = 0; i < 3; i++) expect((await api(`/v1/sandboxes/${id}/exec`, { method: "POST", body: JSON.stringify({ argv: ["true"] }) })).status).toBe(200);
    await expect.poll(() => row.locator('[data-label="Execs"]').textContent(), { timeout: 5_000 }).toBe("3");
    await screenshot(page, "sandboxes-one");

    // Cancel keeps it; Kill releases it.
    await page.getByRole("button", { name: `Kill sandbox ${id}` }).click();
    const dialog = page.getByRole("dialog");
    await dialog.waitFor();
    await dialog.getByRole("button", { name: "Cancel" }).click();
    expect((await api(`/v1/sandboxes/${id}`)).status).toBe(200);
    await page.getByRole("button", { name: `Kill sandbox ${id}` }).click();
    await dialog.getByRole("button", { name: "Kill" }).click();
    await row.waitFor({ state: "detached", timeout: 5_000 });
    expect((await api(`/v1/sandboxes/${id}`)).status).toBe(404);

    // Killed elsewhere (the API): gone from the page within a second too.
    const other = (await (await api("/v1/sandboxes", { method: "POST", body: JSON.stringify({ pool: "agent" }) })).json()) as { id: string };
    await page.locator(`[data-sandbox-id="${other.id}"]`).waitFor({ timeout: 1_000 });
    expect((await api(`/v1/sandboxes/${other.id}`, { method: "DELETE" })).status).toBe(204);
    const t1 = performance.now();
    await page.locator(`[data-sandbox-id="${other.id}"]`).waitFor({ state: "detached", timeout: 5_000 });
    expect(performance.now() - t1).toBeLessThan(1_000);
    await page.close();
  });
});

describe("watch mode", () => {
  it("shows the bake an edit of agent's helper starts, live, then why agent rebaked", async () => {
    const page = await signedIn("graph");
    const agent = page.locator('[data-image="agent"]');
    await agent.waitFor();
    const before = ((await (await api("/v1/images")).json()) as { images: { name: string; key: string }[] }).images.find((i) => i.name === "agent")!.key;
    const helper = join(project, "lib", "prepare.ts");
    writeFileSync(helper, readFileSync(helper, "utf8").replace('"answer": 42', '"answer": 43'));

    // The node turns to building and names the bake's step while it runs.
    await page.locator('[data-image="agent"].building').waitFor({ timeout: 60_000 });
    await expect.poll(() => agent.textContent(), { timeout: 60_000, interval: 50 }).toMatch(/booting|staging|running the warmup|capturing/);
    await screenshot(page, "graph-building");
    // Then it is baked with a new key, shown without a reload.
    await expect.poll(async () => ((await (await api("/v1/images")).json()) as { images: { name: string; key: string; cached: boolean }[] }).images.find((i) => i.name === "agent"), { timeout: 300_000, interval: 500 }).toMatchObject({ cached: true, key: expect.not.stringMatching(before) });
    const after = ((await (await api("/v1/images")).json()) as { images: { name: string; key: string }[] }).images.find((i) => i.name === "agent")!.key;
    await expect.poll(() => agent.textContent(), { timeout: 20_000 }).toContain(after.slice(0, 12));
    expect(await page.locator('[data-image="python"]').textContent()).not.toMatch(/building/);

    await agent.click();
    const details = page.getByRole("complementary", { name: "Image details" });
    await expect.poll(() => details.textContent(), { timeout: 10_000 }).toContain("lib/prepare.ts");
    expect(await details.textContent()).toContain(before.slice(0, 12));
    await screenshot(page, "graph-rebaked");

    // The events view has the round and the bake's steps.
    await page.goto(`${server.url}/#events`);
    const log = page.getByRole("log");
    await log.waitFor();
    await expect.poll(() => log.locator('[data-kind="watch"][data-type="round-done"]').count(), { timeout: 10_000 }).toBeGreaterThan(0);
    expect(await log.locator('[data-kind="bake"][data-type="progress"]').count()).toBeGreaterThan(0);
    expect(await log.textContent()).toContain("agent");
    await page.close();
  }, 600_000);
});

describe("every view", () => {
  const views = ["graph", "pools", "sandboxes", "events"] as const;
  const sizes = { desktop: { width: 1280, height: 800 }, phone: { width: 390, height: 844 } } as const;

  it("passes axe-core's WCAG A/AA checks in both themes at desktop and phone widths, and is saved as screenshots", async () => {
    // One sandbox alive, so the pool and sandbox views show one.
    const sb = (await (await api("/v1/sandboxes", { method: "POST", body: JSON.stringify({ pool: "agent" }) })).json()) as { id: string };
    try {
      for (const [size, viewport] of Object.entries(sizes)) {
        for (const theme of ["light", "dark"] as const) {
          const page = await signedIn("graph", viewport);
          const toggle = page.getByRole("button", { name: "Dark theme" });
          if ((await toggle.getAttribute("aria-pressed")) !== String(theme === "dark")) await toggle.click();
          expect(await page.evaluate("document.documentElement.dataset.theme")).toBe(theme);
          for (const view of views) {
            await page.goto(`${server.url}/#${view}`);
            await page.getByRole("heading", { level: 2 }).first().waitFor();
            if (view === "graph") await page.locator('[data-image="agent"]').waitFor();
            if (view === "sandboxes") await page.locator(`[data-sandbox-id="${sb.id}"]`).waitFor();
            if (view === "pools") await page.getByRole("img").first().waitFor();
            const violations = await accessibilityViolations(page);
            expect(violations, `${view}, ${theme}, ${size}: ${JSON.stringify(violations, null, 1)}`).toEqual([]);
            // Nothing overflows the viewport but the scroll containers.
            const overflow = await page.evaluate<number>("document.documentElement.scrollWidth - window.innerWidth");
            expect(overflow, `${view}, ${theme}, ${size}: the page is ${overflow} px wider than the viewport`).toBeLessThanOrEqual(0);
            await screenshot(page, `${view}-${theme}-${size}`);
          }
          await page.close();
        }
      }
    } finally {
      await api(`/v1/sandboxes/${sb.id}`, { method: "DELETE" });
    }
  }, 600_000);
});
