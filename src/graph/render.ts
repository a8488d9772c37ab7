/**
 * The project's image graph as a document for docs and pull requests: a standalone SVG picture
 * (laid out by layout.ts, as the serve page draws it), Graphviz DOT, or a mermaid flowchart
 * (which GitHub renders in Markdown). Pure: no Node API, so the web page can bundle it too.
 *
 * Every image shows the same lines in every format: its name, `key <12 hex>` when its key is
 * known, and `cached · <size>` or `not baked` when whether it is baked is known.
 */
import { formatBytes, keyPrefix, layoutGraph, NODE_HEIGHT, NODE_WIDTH, type GraphImage } from "./layout.js";

/** The colours of one scheme. Text colours meet WCAG AA (4.5:1) on the fill they are drawn on. */
export interface GraphPalette {
  background: string;
  edge: string;
  /** An image that is not baked (or whose state is unknown). */
  image: { fill: string; stroke: string; name: string; meta: string };
  /** An image baked with its current key. */
  cached: { fill: string; stroke: string; name: string; meta: string };
}

export const GRAPH_PALETTE: { light: GraphPalette; dark: GraphPalette } = {
  light: {
    background: "#ffffff",
    edge: "#57606a",
    image: { fill: "#ffffff", stroke: "#57606a", name: "#1f2328", meta: "#57606a" },
    cached: { fill: "#dafbe1", stroke: "#1a7f37", name: "#1f2328", meta: "#505a63" },
  },
  dark: {
    background: "#0d1117",
    edge: "#8b949e",
    image: { fill: "#161b22", stroke: "#8b949e", name: "#e6edf3", meta: "#9198a1" },
    cached: { fill: "#12261e", stroke: "#3fb950", name: "#e6edf3", meta: "#a1aab4" },
  },
};

export interface SvgOptions {
  /** The document's `<title>` (default "Image graph"). */
  title?: string;
  /**
   * Prefix of every `id` in the document (default "smg-"): two pictures inlined in one HTML
   * page need different prefixes.
   */
  idPrefix?: string;
}

/** `cached · 12.3 MiB`, `not baked`, or null when the image's state is unknown. */
export function imageState(img: GraphImage): string | null {
  if (img.cached === true) return img.sizeBytes === null || img.sizeBytes === undefined ? "cached" : `cached · ${formatBytes(img.sizeBytes)}`;
  if (img.cached === false) return "not baked";
  return null;
}

/** What every format shows of an image, one entry a line: name, key prefix, state. */
export function imageLines(img: GraphImage): string[] {
  const key = keyPrefix(img.key);
  const state = imageState(img);
  return [img.name, ...(key ? [`key ${key}`] : []), ...(state ? [state] : [])];
}

/** Parent → child pairs; a parent missing from `images` makes its child a root, as in layoutGraph. */
function edgesOf(images: GraphImage[]): { from: string; to: string }[] {
  const names = new Set(images.map((i) => i.name));
  return images.flatMap((i) => (i.parent !== null && names.has(i.parent) ? [{ from: i.parent, to: i.name }] : []));
}

// XML 1.0 forbids most control characters, lone surrogates and U+FFFE/U+FFFF even as references;
// U+FFFD itself is matched too, so that it is always written as a reference.
// eslint-disable-next-line no-control-regex
const NOT_XML_CHAR = /[\u0000-\u0008\u000b\u000c\u000e-\u001f\ufffd-\uffff]|[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;
const XML_ENTITIES: Record<string, string> = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;" };

/**
 * Text or an attribute value for XML: the five special characters escaped, characters XML cannot
 * hold replaced by U+FFFD (as a reference: parsers take a literal one for an encoding problem).
 */
export function escapeXml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => XML_ENTITIES[c]!).replace(NOT_XML_CHAR, "&#xFFFD;");
}

/** A valid, unique XML ID fragment for any name: letters, digits and '-' kept, anything else `_<hex>_`. */
function idFragment(name: string): string {
  return [...name].map((c) => (/[A-Za-z0-9-]/.test(c) ? c : `_${c.codePointAt(0)!.toString(16)}_`)).join("");
}

const num = (n: number) => String(Math.round(n * 10) / 10);

function svgStyle(p: string): string {
  const scheme = (c: GraphPalette) =>
    [
      `.${p}bg { fill: ${c.background}; }`,
      `.${p}edge { stroke: ${c.edge}; }`,
      `.${p}arrow { fill: ${c.edge}; }`,
      `.${p}image rect { fill: ${c.image.fill}; stroke: ${c.image.stroke}; }`,
      `.${p}image .${p}name { fill: ${c.image.name}; }`,
      `.${p}image .${p}meta { fill: ${c.image.meta}; }`,
      `.${p}cached rect { fill: ${c.cached.fill}; stroke: ${c.cached.stroke}; }`,
      `.${p}cached .${p}name { fill: ${c.cached.name}; }`,
      `.${p}cached .${p}meta { fill: ${c.cached.meta}; }`,
    ].join("\n");
  const indent = (s: string) => s.replace(/^/gm, "  ");
  return [
    `text { font-family: ui-sans-serif, system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 11px; }`,
    `.${p}name { font-size: 13px; font-weight: bold; }`,
    `.${p}key { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }`,
    `.${p}edge { fill: none; stroke-width: 1.5; }`,
    `.${p}image rect { stroke-width: 1.5; stroke-dasharray: 4 3; }`,
    `.${p}cached rect { stroke-width: 1.5; stroke-dasharray: none; }`,
    scheme(GRAPH_PALETTE.light),
    `@media (prefers-color-scheme: dark) {\n${indent(scheme(GRAPH_PALETTE.dark))}\n}`,
  ].join("\n");
}

/**
 * A standalone SVG document of the graph: parents above children, edges with arrows from parent
 * to child, cached images filled and framed solid, the others framed dashed. Light colours, dark
 * ones under `prefers-color-scheme: dark`.
 */
export function graphToSvg(images: GraphImage[], options: SvgOptions = {}): string {
  const p = options.idPrefix ?? "smg-";
  // The prefix also starts the class names the style selects: it must be a CSS identifier and an XML name.
  if (!/^[A-Za-z_][A-Za-z0-9_-]*$/.test(p)) throw new TypeError(`graphToSvg: idPrefix ${JSON.stringify(p)} is not usable in ids and class names: use letters, digits, '_' and '-', starting with a letter or '_'`);
  const title = options.title ?? "Image graph";
  const layout = layoutGraph(images);
  const width = Math.max(1, layout.width);
  const height = Math.max(1, layout.height);
  const out: string[] = [
    `<?xml version="1.0" encoding="UTF-8"?>`,
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" role="img" aria-labelledby="${p}title">`,
    `<title id="${p}title">${escapeXml(title)}</title>`,
    `<style>\n${svgStyle(p)}\n</style>`,
    `<defs><marker id="${p}arrowhead" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" orient="auto-start-reverse"><path class="${p}arrow" d="M 0 0 L 10 5 L 0 10 z"/></marker></defs>`,
    `<rect class="${p}bg" x="0" y="0" width="${width}" height="${height}"/>`,
  ];
  for (const e of layout.edges) {
    if (e.points.length < 2) continue;
    const d = e.points.map((pt, i) => `${i === 0 ? "M" : "L"} ${num(pt.x)} ${num(pt.y)}`).join(" ");
    out.push(`<path class="${p}edge" data-from="${escapeXml(e.from)}" data-to="${escapeXml(e.to)}" d="${d}" marker-end="url(#${p}arrowhead)"/>`);
  }
  for (const img of layout.images) {
    const lines = imageLines(img);
    const cls = `${p}${img.cached === true ? "cached" : "image"}`;
    const left = img.x - NODE_WIDTH / 2;
    const top = img.y - NODE_HEIGHT / 2;
    // The lines are centred in the box: the name 13px, the others 11px, 16px apart.
    const first = img.y - ((lines.length - 1) * 16) / 2 + 4;
    out.push(`<g id="${escapeXml(`${p}image-${idFragment(img.name)}`)}" class="${escapeXml(cls)}" data-image="${escapeXml(img.name)}">`);
    out.push(`<title>${escapeXml(lines.join("\n"))}</title>`);
    out.push(`<rect x="${num(left)}" y="${num(top)}" width="${NODE_WIDTH}" height="${NODE_HEIGHT}" rx="8" ry="8"/>`);
    lines.forEach((line, i) => {
      const kind = i === 0 ? "name" : line.startsWith("key ") ? "meta key" : "meta";
      const classes = kind.split(" ").map((k) => `${p}${k}`).join(" ");
      // A name too long for the box is squeezed into it rather than cut.
      const fit = i === 0 && line.length > 24 ? ` textLength="${NODE_WIDTH - 16}" lengthAdjust="spacingAndGlyphs"` : "";
      out.push(`<text class="${escapeXml(classes)}" x="${num(img.x)}" y="${num(first + i * 16)}" text-anchor="middle"${fit}>${escapeXml(line)}</text>`);
    });
    out.push(`</g>`);
  }
  out.push(`</svg>`);
  return out.join("\n") + "\n";
}

/** A DOT quoted string: `"` and `\` escaped, line breaks as `\n` (a line break in a label). */
function dotString(s: string): string {
  return `"${s.replace(/[\\"]/g, (c) => `\\${c}`).replace(/\r\n|\r|\n/g, "\\n")}"`;
}

/** Graphviz DOT of the graph (`dot -Tsvg`): one box per image, cached ones filled green. */
export function graphToDot(images: GraphImage[]): string {
  const c = GRAPH_PALETTE.light;
  const out = [
    `digraph "images" {`,
    `  rankdir=TB;`,
    `  node [shape=box, style="rounded,dashed", color=${dotString(c.image.stroke)}, fontcolor=${dotString(c.image.name)}, fontname="Helvetica"];`,
    `  edge [color=${dotString(c.edge)}];`,
  ];
  for (const img of images) {
    // Each line is escaped on its own, so the `\n` between them stays a line break.
    const label = imageLines(img).map((l) => dotString(l).slice(1, -1)).join("\\n");
    const style = img.cached === true ? `, style="rounded,filled", fillcolor=${dotString(c.cached.fill)}, color=${dotString(c.cached.stroke)}` : "";
    out.push(`  ${dotString(img.name)} [label="${label}"${style}];`);
  }
  for (const e of edgesOf(images)) out.push(`  ${dotString(e.from)} -> ${dotString(e.to)};`);
  out.push("}");
  return out.join("\n") + "\n";
}

/**
 * Text for a mermaid label in double quotes: letters, digits and plain punctuation as they are,
 * anything mermaid or the HTML it renders could read as syntax (`"`, `#`, `<`, `&`, backticks,
 * brackets...) as an entity code (`#quot;`, `#60;`).
 */
function mermaidText(s: string): string {
  return [...s].map((c) => (c === '"' ? "#quot;" : /[\p{L}\p{N} .,:/()+=@_·-]/u.test(c) ? c : `#${c.codePointAt(0)};`)).join("");
}

/** A mermaid flowchart of the graph (renders in GitHub Markdown): nodes `n0`, `n1`... in the order of `images`. */
export function graphToMermaid(images: GraphImage[]): string {
  const c = GRAPH_PALETTE.light;
  const ids = new Map(images.map((img, i) => [img.name, `n${i}`]));
  const out = ["flowchart TD"];
  for (const img of images) out.push(`  ${ids.get(img.name)}["${imageLines(img).map(mermaidText).join("<br/>")}"]`);
  for (const e of edgesOf(images)) out.push(`  ${ids.get(e.from)} --> ${ids.get(e.to)}`);
  out.push(`  classDef image fill:${c.image.fill},stroke:${c.image.stroke},color:${c.image.name},stroke-dasharray:4 3`);
  out.push(`  classDef cached fill:${c.cached.fill},stroke:${c.cached.stroke},color:${c.cached.name}`);
  const cached = images.filter((i) => i.cached === true).map((i) => ids.get(i.name)!);
  const others = images.filter((i) => i.cached !== true).map((i) => ids.get(i.name)!);
  if (others.length) out.push(`  class ${others.join(",")} image`);
  if (cached.length) out.push(`  class ${cached.join(",")} cached`);
  return out.join("\n") + "\n";
}
