// The image graph as documents (src/graph/render.ts): SVG that is well-formed XML in the SVG
// namespace with every image's lines as text, names with XML's special characters escaped and
// read back as they were; DOT and mermaid with every image and edge, mermaid ids sanitized; the
// colours readable (WCAG AA) in both schemes.
import { DOMParser, type Element as XmlElement } from "@xmldom/xmldom";
import { describe, expect, it } from "vitest";
import type { GraphImage } from "../../src/graph/layout.js";
import { escapeXml, GRAPH_PALETTE, graphToDot, graphToMermaid, graphToSvg, imageLines } from "../../src/graph/render.js";

const KEY = `sha256:${"0123456789ab".repeat(5)}cdef`;
const IMAGES: GraphImage[] = [
  { name: "python", parent: null, key: KEY, cached: true, sizeBytes: 12.3 * 2 ** 20 },
  { name: "agent", parent: "python", key: KEY.replace("0123", "fedc"), cached: false, sizeBytes: null },
  { name: "tools", parent: "agent" },
  { name: "lone", parent: null, key: null, cached: true, sizeBytes: null },
];
/** Names a document must not take for syntax. */
const HOSTILE: GraphImage[] = [
  { name: `a<b>&"c'`, parent: null, cached: false },
  { name: `x]]>--><!-- "q" #quot; \\`, parent: `a<b>&"c'`, cached: true, sizeBytes: 2048 },
  { name: "end", parent: `x]]>--><!-- "q" #quot; \\`, key: KEY },
  { name: "a-very-long-image-name-that-does-not-fit-the-box", parent: null },
];

/** Parses `xml`, failing on any error or warning of the parser. */
function parseXml(xml: string) {
  const problems: string[] = [];
  const doc = new DOMParser({ onError: (level, msg) => void problems.push(`${level}: ${msg}`) }).parseFromString(xml, "image/svg+xml");
  expect(problems).toEqual([]);
  return doc;
}

const texts = (root: XmlElement) => Array.from(root.getElementsByTagName("text")).map((t) => t.textContent);

describe("graphToSvg", () => {
  it("is a standalone SVG document: the SVG namespace, a size, a title, a style with a dark scheme", () => {
    const svg = graphToSvg(IMAGES, { title: "Images of demo" });
    const root = parseXml(svg).documentElement!;
    expect(root.localName).toBe("svg");
    expect(root.namespaceURI).toBe("http://www.w3.org/2000/svg");
    const [w, h] = [Number(root.getAttribute("width")), Number(root.getAttribute("height"))];
    expect(w).toBeGreaterThan(0);
    expect(h).toBeGreaterThan(0);
    expect(root.getAttribute("viewBox")).toBe(`0 0 ${w} ${h}`);
    expect(root.getElementsByTagName("title")[0]!.textContent).toBe("Images of demo");
    const style = root.getElementsByTagName("style")[0]!.textContent!;
    expect(style).toContain("@media (prefers-color-scheme: dark)");
    expect(style).toContain(GRAPH_PALETTE.dark.image.fill);
  });

  it("draws each image as a group with a rounded box and its lines, and an arrow per parent link", () => {
    const root = parseXml(graphToSvg(IMAGES)).documentElement!;
    const groups = Array.from(root.getElementsByTagName("g"));
    expect(groups.map((g) => g.getAttribute("data-image"))).toEqual(IMAGES.map((i) => i.name));
    for (const [i, g] of groups.entries()) {
      expect(g.getAttribute("id")).toMatch(/^smg-image-[A-Za-z0-9_-]+$/);
      expect(Number(g.getElementsByTagName("rect")[0]!.getAttribute("rx"))).toBeGreaterThan(0);
      expect(texts(g)).toEqual(imageLines(IMAGES[i]!));
    }
    expect(texts(groups[0]!)).toEqual(["python", "key 0123456789ab", "cached · 12.3 MiB"]);
    expect(texts(groups[1]!)).toEqual(["agent", "key fedc456789ab", "not baked"]);
    expect(texts(groups[2]!)).toEqual(["tools"]);
    expect(texts(groups[3]!)).toEqual(["lone", "cached"]);
    expect(groups[0]!.getAttribute("class")).toBe("smg-cached");
    expect(groups[1]!.getAttribute("class")).toBe("smg-image");
    // The name is bold (its class), the other lines are not.
    expect(groups[0]!.getElementsByTagName("text")[0]!.getAttribute("class")).toBe("smg-name");
    const paths = Array.from(root.getElementsByTagName("path")).filter((p) => p.getAttribute("data-from") !== null);
    expect(paths.map((p) => `${p.getAttribute("data-from")}>${p.getAttribute("data-to")}`).sort()).toEqual(["agent>tools", "python>agent"]);
    for (const p of paths) {
      expect(p.getAttribute("d")).toMatch(/^M [\d.]+ [\d.]+( L [\d.]+ [\d.]+)+$/);
      expect(p.getAttribute("marker-end")).toBe("url(#smg-arrowhead)");
    }
    expect(root.getElementsByTagName("marker")[0]!.getAttribute("id")).toBe("smg-arrowhead");
  });

  it("escapes names with XML's special characters, and they read back as they were", () => {
    const svg = graphToSvg(HOSTILE);
    expect(svg).not.toContain("a<b>");
    expect(svg).toContain("a&lt;b&gt;&amp;&quot;c&apos;");
    const root = parseXml(svg).documentElement!;
    const groups = Array.from(root.getElementsByTagName("g"));
    expect(groups.map((g) => g.getAttribute("data-image"))).toEqual(HOSTILE.map((i) => i.name));
    const ids = groups.map((g) => g.getAttribute("id")!);
    for (const id of ids) expect(id).toMatch(/^smg-image-[A-Za-z0-9_-]+$/);
    expect(new Set(ids).size).toBe(ids.length);
    const all = texts(root);
    for (const img of HOSTILE) expect(all).toContain(img.name);
    // Too long for the box: squeezed into it, not cut.
    const long = groups[3]!.getElementsByTagName("text")[0]!;
    expect(long.getAttribute("textLength")).not.toBeNull();
    const edges = Array.from(root.getElementsByTagName("path")).filter((p) => p.getAttribute("data-from") !== null);
    expect(edges.map((p) => p.getAttribute("data-to")).sort()).toEqual([HOSTILE[1]!.name, "end"].sort());
  });

  it("replaces characters XML cannot hold, takes another id prefix, refuses one that cannot be an id", () => {
    const root = parseXml(graphToSvg([{ name: "bell\u0007\ud800\ufffd", parent: null }], { idPrefix: "p2_" })).documentElement!;
    expect(texts(root)).toEqual(["bell\ufffd\ufffd\ufffd"]);
    expect(root.getElementsByTagName("g")[0]!.getAttribute("id")).toMatch(/^p2_image-/);
    expect(() => graphToSvg([], { idPrefix: 'x" onload="' })).toThrow(/idPrefix/);
    expect(escapeXml(`<&>"'`)).toBe("&lt;&amp;&gt;&quot;&apos;");
  });

  it("draws an empty graph as a valid, empty picture", () => {
    const root = parseXml(graphToSvg([])).documentElement!;
    expect(root.getElementsByTagName("g").length).toBe(0);
    expect(Number(root.getAttribute("width"))).toBeGreaterThan(0);
  });
});

/** WCAG relative luminance and contrast ratio of #rrggbb colours. */
function contrast(a: string, b: string): number {
  const lum = (hex: string) => {
    const [r, g, bl] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16) / 255).map((v) => (v <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4));
    return 0.2126 * r! + 0.7152 * g! + 0.0722 * bl!;
  };
  const [hi, lo] = [lum(a), lum(b)].sort((x, y) => y - x);
  return (hi! + 0.05) / (lo! + 0.05);
}

describe("the picture's colours", () => {
  it.each(["light", "dark"] as const)("meet WCAG AA in the %s scheme: text 4.5:1 on its box, frames and arrows 3:1 on the background", (scheme) => {
    const p = GRAPH_PALETTE[scheme];
    for (const box of [p.image, p.cached]) {
      expect(contrast(box.name, box.fill)).toBeGreaterThanOrEqual(4.5);
      expect(contrast(box.meta, box.fill)).toBeGreaterThanOrEqual(4.5);
      expect(contrast(box.stroke, p.background)).toBeGreaterThanOrEqual(3);
    }
    expect(contrast(p.edge, p.background)).toBeGreaterThanOrEqual(3);
  });
});

describe("graphToDot", () => {
  it("is a top-down digraph with every image, quoted, labelled with its lines, and every edge", () => {
    const dot = graphToDot(IMAGES);
    expect(dot).toMatch(/^digraph "images" \{\n {2}rankdir=TB;\n/);
    expect(dot.trimEnd().endsWith("}")).toBe(true);
    expect(dot).toContain(`"python" [label="python\\nkey 0123456789ab\\ncached · 12.3 MiB", style="rounded,filled"`);
    expect(dot).toContain(`"agent" [label="agent\\nkey fedc456789ab\\nnot baked"];`);
    expect(dot).toContain(`"tools" [label="tools"];`);
    expect(dot).toContain(`"python" -> "agent";`);
    expect(dot).toContain(`"agent" -> "tools";`);
    expect(dot.match(/->/g)).toHaveLength(2);
  });

  it("escapes quotes and backslashes in ids and labels", () => {
    const dot = graphToDot(HOSTILE);
    expect(dot).toContain(`"a<b>&\\"c'" [label="a<b>&\\"c'\\nnot baked"];`);
    expect(dot).toContain(`"a<b>&\\"c'" -> "x]]>--><!-- \\"q\\" #quot; \\\\";`);
    expect(dot).toContain(`"x]]>--><!-- \\"q\\" #quot; \\\\" -> "end";`);
    // Every quoted string closes: no `"` is left unescaped inside one.
    for (const line of dot.split("\n")) expect(line.replace(/\\./g, "").split('"').length % 2).toBe(1);
  });
});

describe("graphToMermaid", () => {
  it("is a top-down flowchart: nodes n0, n1... labelled with the image's lines, edges parent --> child", () => {
    const m = graphToMermaid(IMAGES);
    const lines = m.trimEnd().split("\n");
    expect(lines[0]).toBe("flowchart TD");
    expect(lines).toContain(`  n0["python<br/>key 0123456789ab<br/>cached · 12.3 MiB"]`);
    expect(lines).toContain(`  n1["agent<br/>key fedc456789ab<br/>not baked"]`);
    expect(lines).toContain(`  n2["tools"]`);
    expect(lines).toContain(`  n3["lone<br/>cached"]`);
    expect(lines).toContain("  n0 --> n1");
    expect(lines).toContain("  n1 --> n2");
    expect(lines.filter((l) => l.includes("-->"))).toHaveLength(2);
    expect(lines).toContain("  class n0,n3 cached");
  });

  it("sanitizes ids and escapes what mermaid would read as syntax", () => {
    const m = graphToMermaid(HOSTILE);
    const nodes = m.split("\n").filter((l) => l.includes('["'));
    expect(nodes).toHaveLength(HOSTILE.length);
    for (const [i, line] of nodes.entries()) {
      const parsed = /^ {2}(n\d+)\["(.*)"\]$/.exec(line);
      expect(parsed?.[1]).toBe(`n${i}`);
      // Inside the quotes: no quote, and no markup but the line breaks.
      expect(parsed![2]!.replace(/<br\/>/g, "")).not.toMatch(/["<>&`[\]{}|\\]/);
    }
    expect(nodes[0]).toBe(`  n0["a#60;b#62;#38;#quot;c#39;<br/>not baked"]`);
    expect(nodes[1]).toContain("#35;quot#59;");
    expect(m).toContain("  n0 --> n1");
    expect(m).toContain("  n1 --> n2");
    // Names are never ids: "end" would close a subgraph.
    expect(m).not.toMatch(/^\s*end\b/m);
  });
});
