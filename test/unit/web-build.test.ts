// The web page of `supermachine serve` (web/, built by scripts/build-web.mjs): the build writes the
// three files the server maps (`/` → index.html, `/ui/app.js`, `/ui/app.css`), the bundle loads
// nothing from elsewhere, and index.html has nothing the server's CSP would block.
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const root = join(import.meta.dirname, "..", "..");

describe("scripts/build-web.mjs", () => {
  let parent: string;
  let out: string;
  let result: ReturnType<typeof spawnSync>;

  beforeAll(() => {
    parent = mkdtempSync(join(tmpdir(), "sm-web-build-"));
    out = join(parent, "web");
    result = spawnSync(process.execPath, [join(root, "scripts", "build-web.mjs"), "--out", out], { encoding: "utf8" });
  });
  afterAll(() => rmSync(parent, { recursive: true, force: true }));

  it("builds quietly into the directory it is given, leaving no temporary directory", () => {
    expect(result.stderr).toBe("");
    expect(result.stdout).toBe("");
    expect(result.status).toBe(0);
    for (const f of ["index.html", "app.js", "app.css", "app.js.map"]) expect(existsSync(join(out, f)), f).toBe(true);
    expect(readdirSync(parent)).toEqual(["web"]);
  });

  it("bundles a script that loads nothing from another origin", () => {
    const js = readFileSync(join(out, "app.js"), "utf8");
    // The only absolute URLs are the XML namespaces Preact creates SVG and MathML elements in.
    const urls = [...js.matchAll(/https?:\/\/[^\s"'`)]+/g)].map((m) => m[0]);
    for (const url of urls) expect(url).toMatch(/^http:\/\/www\.w3\.org\//);
    expect(js).not.toMatch(/import\s*\(\s*["'`]https?:/);
    expect(js).not.toMatch(/\bimportScripts\s*\(/);
    expect(js).toContain("//# sourceMappingURL=app.js.map");
  });

  it("writes an index.html that loads /ui/app.js and /ui/app.css, with no inline script or style", () => {
    const html = readFileSync(join(out, "index.html"), "utf8");
    expect(html).toMatch(/<html lang="en">/);
    expect(html).toMatch(/<title>supermachine<\/title>/);
    expect(html).toMatch(/<script type="module" src="\/ui\/app\.js"><\/script>/);
    expect(html).toMatch(/<link rel="stylesheet" href="\/ui\/app\.css"/);
    // Every <script> has a src and no body; no style element or attribute; no handler attribute.
    for (const m of html.matchAll(/<script\b([^>]*)>([\s\S]*?)<\/script>/g)) {
      expect(m[1]).toMatch(/\bsrc=/);
      expect(m[2]!.trim()).toBe("");
    }
    expect(html).not.toMatch(/<style\b|\sstyle=|\son[a-z]+=/i);
    expect(html).not.toMatch(/https?:\/\//);
  });

  it("copies web/styles.css as app.css, with no font or import from elsewhere", () => {
    const css = readFileSync(join(out, "app.css"), "utf8");
    expect(css).toBe(readFileSync(join(root, "web", "styles.css"), "utf8"));
    expect(css).not.toMatch(/@import|url\(\s*["']?https?:/);
  });
});
