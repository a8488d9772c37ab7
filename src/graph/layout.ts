/**
 * Where each image of a project's graph goes in a picture: parents above children, laid out by
 * dagre (a layered graph layout). Pure: no Node API, so the web page of `supermachine serve`
 * bundles it and draws the same picture `supermachine graph --format svg` writes.
 */
import { Graph, layout } from "@dagrejs/dagre";

/** What a picture of the graph shows of one image. */
export interface GraphImage {
  name: string;
  parent: string | null;
  /** Its content key (the picture shows its first 12 hex digits), when known. */
  key?: string | null;
  /** Baked with its current key. */
  cached?: boolean | null;
  /** Bytes on disk of its snapshot, when cached. */
  sizeBytes?: number | null;
}

export interface PlacedImage extends GraphImage {
  /** The box's centre and size, in picture units (px). */
  x: number;
  y: number;
  width: number;
  height: number;
}

export interface PlacedEdge {
  from: string;
  to: string;
  /** Polyline from the parent's box to the child's. */
  points: { x: number; y: number }[];
}

export interface GraphLayout {
  width: number;
  height: number;
  images: PlacedImage[];
  edges: PlacedEdge[];
}

export const NODE_WIDTH = 200;
export const NODE_HEIGHT = 64;
const MARGIN = 16;

/** The key as the picture shows it: its first 12 hex digits. */
export const keyPrefix = (key: string | null | undefined): string => (key ? key.replace(/^sha256:/, "").slice(0, 12) : "");

/** A size as people read it (MiB with one decimal, KiB, or bytes). */
export function formatBytes(n: number | null | undefined): string {
  if (n === null || n === undefined) return "";
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(1)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MiB`;
  if (n >= 2 ** 10) return `${(n / 2 ** 10).toFixed(1)} KiB`;
  return `${n} B`;
}

/**
 * Places `images` (parents above children; an image whose parent is not in the list is drawn as
 * a root). The order of `images` decides the order of siblings, so the same graph gives the same
 * picture.
 */
export function layoutGraph(images: GraphImage[]): GraphLayout {
  const g = new Graph({ multigraph: false, compound: false });
  g.setGraph({ rankdir: "TB", nodesep: 32, ranksep: 48, marginx: MARGIN, marginy: MARGIN });
  g.setDefaultEdgeLabel(() => ({}));
  const names = new Set(images.map((i) => i.name));
  for (const img of images) g.setNode(img.name, { width: NODE_WIDTH, height: NODE_HEIGHT });
  for (const img of images) if (img.parent !== null && names.has(img.parent)) g.setEdge(img.parent, img.name);
  layout(g);
  const placed = images.map((img) => {
    const n = g.node(img.name) as { x: number; y: number; width: number; height: number };
    return { ...img, x: n.x, y: n.y, width: n.width, height: n.height };
  });
  const edges = g.edges().map((e: { v: string; w: string }) => ({ from: e.v, to: e.w, points: ((g.edge(e) as { points?: { x: number; y: number }[] }).points ?? []).map((p) => ({ x: p.x, y: p.y })) }));
  const label = g.graph() as { width?: number; height?: number };
  return { width: Math.ceil(label.width ?? 0), height: Math.ceil(label.height ?? 0), images: placed, edges };
}
