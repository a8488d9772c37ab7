/**
 * The image graph: nodes are images, edges go from a parent (`from`) to its children. A root
 * image has a `ref`; a child is baked on its parent's snapshot, so it inherits what a snapshot
 * fixes (memory, vCPUs, the workload, the root filesystem) and adds its own extraFiles, env and
 * warmup. This module only checks and resolves declarations (each option as the option table
 * says, src/schema/options.ts); it does no I/O.
 */
import { Graph, alg } from "@dagrejs/graphlib";
import { GraphError } from "../errors.js";
import { buildOptions, resolveValue, type BuildOptions, type OptionRow, type ResolvedImageOptions } from "../schema/options.js";

/** What a declaration may set: the build options as written, none defaulted yet. */
export type ImageFields = Partial<BuildOptions>;

/** One declared image, as the config loader (or Image.build) hands it over. */
export interface DeclaredImage {
  name: string;
  /** The module that declared it (its code is part of the key), or null (the API). */
  module: string | null;
  /** Parent image name, or null for a root image (which has `ref`). */
  from: string | null;
  definition: ImageFields;
}

/**
 * A node with everything resolved: defaults applied and inherited values filled in, option by
 * option as the option table says (src/schema/options.ts: `child`). A child's `ref` is its
 * root's; `extraFiles`, `warmup` and `network` are each image's own.
 */
export type NodeSpec = ResolvedImageOptions & {
  name: string;
  module: string | null;
  parent: string | null;
};

export class ImageGraph {
  /** @internal */
  constructor(
    private readonly g: Graph,
    private readonly specs: Map<string, NodeSpec>,
  ) {}

  /** Image names, parents before children (declaration order among independent images). */
  get order(): string[] {
    return alg.topsort(this.g) as string[];
  }

  get names(): string[] {
    return [...this.specs.keys()];
  }

  has(name: string): boolean {
    return this.specs.has(name);
  }

  spec(name: string): NodeSpec {
    const s = this.specs.get(name);
    if (!s) throw new GraphError("GRAPH_UNKNOWN_IMAGE", `no image named ${JSON.stringify(name)}`, { hint: `images: ${this.names.join(", ") || "(none)"}` });
    return s;
  }

  parent(name: string): string | null {
    return this.spec(name).parent;
  }

  children(name: string): string[] {
    return (this.g.successors(name) as string[] | undefined) ?? [];
  }

  /** `names` and every ancestor of them, parents first. */
  withAncestors(names: string[]): string[] {
    const want = new Set<string>();
    for (const n of names) {
      for (let cur: string | null = this.spec(n).name; cur !== null; cur = this.spec(cur).parent) want.add(cur);
    }
    return this.order.filter((n) => want.has(n));
  }

  /** Every image below `name` (children, grandchildren, ...). */
  descendants(name: string): string[] {
    const out: string[] = [];
    const visit = (n: string) => {
      for (const c of this.children(n)) {
        out.push(c);
        visit(c);
      }
    };
    visit(name);
    return out;
  }
}

/** Checks the declarations and resolves every node. */
export function buildImageGraph(images: DeclaredImage[]): ImageGraph {
  const g = new Graph({ directed: true });
  const byName = new Map<string, DeclaredImage>();
  for (const img of images) {
    if (byName.has(img.name)) {
      throw new GraphError("GRAPH_DUPLICATE_NAME", `two images are named ${JSON.stringify(img.name)} (${where(byName.get(img.name)!)} and ${where(img)})`, {
        hint: "give one of them another `name`",
      });
    }
    byName.set(img.name, img);
    g.setNode(img.name);
  }
  const known = () => [...byName.keys()].sort().join(", ");
  for (const img of images) {
    const d = img.definition;
    if (img.from === null && !d.ref) {
      throw new GraphError("GRAPH_NO_BASE", `image ${JSON.stringify(img.name)} (${where(img)}) has neither ref nor from`, {
        hint: "set ref to an image reference, or from to another image of the project",
      });
    }
    if (img.from !== null) {
      if (d.ref !== undefined) {
        throw new GraphError("GRAPH_REF_AND_FROM", `image ${JSON.stringify(img.name)} (${where(img)}) has both ref and from`, {
          hint: "a root image has ref; an image built on another has from",
        });
      }
      if (!byName.has(img.from)) {
        throw new GraphError("GRAPH_UNKNOWN_PARENT", `image ${JSON.stringify(img.name)} (${where(img)}) is built from ${JSON.stringify(img.from)}, which is not an image of this project`, {
          hint: `known images: ${known()}`,
        });
      }
      g.setEdge(img.from, img.name);
    }
  }
  if (!alg.isAcyclic(g)) {
    const cycles = alg.findCycles(g) as string[][];
    const cycle = [...(cycles[0] ?? [])].reverse();
    throw new GraphError("GRAPH_CYCLE", `images are built from each other in a cycle: ${[...cycle, cycle[0]].map((n) => JSON.stringify(n)).join(" → ")}`, {
      hint: "one image of the cycle must have a ref instead of from",
    });
  }
  const specs = new Map<string, NodeSpec>();
  for (const name of alg.topsort(g) as string[]) {
    const img = byName.get(name)!;
    specs.set(name, resolveNode(img, img.from === null ? undefined : specs.get(img.from)!));
  }
  // Keep declaration order as the iteration order of names.
  const ordered = new Map(images.map((i) => [i.name, specs.get(i.name)!]));
  return new ImageGraph(g, ordered);
}

function where(img: DeclaredImage): string {
  return img.module ?? "Image.build";
}

function resolveNode(img: DeclaredImage, parent: NodeSpec | undefined): NodeSpec {
  const d = img.definition as Record<string, unknown>;
  const p = parent as Record<string, unknown> | undefined;
  const node: Record<string, unknown> = { name: img.name, module: img.module, parent: parent?.name ?? null };
  for (const [k, row] of Object.entries(buildOptions) as [string, OptionRow][]) {
    const own = d[k];
    if (row.child === "call") continue;
    // A root image takes its own value (or the default); a child goes by the row's rule.
    switch (parent ? row.child : "own") {
      case "root":
        if (own !== undefined) {
          throw new GraphError("GRAPH_CHILD_OPTION", `image ${JSON.stringify(img.name)} (${where(img)}) sets ${k}, but it is built from ${JSON.stringify(parent!.name)}: ${k} belongs to the root image of the chain`, {
            hint: `remove ${k} here, or set it on the root image`,
          });
        }
        node[k] = p![k];
        break;
      case "same":
        if (own !== undefined && own !== p![k]) {
          throw new GraphError("GRAPH_CHILD_SHAPE", `image ${JSON.stringify(img.name)} (${where(img)}) sets ${k} ${String(own)}, but its parent ${JSON.stringify(parent!.name)} has ${String(p![k])}: a child runs on its parent's snapshot, which fixes ${k}`, {
            hint: `remove ${k} (it is inherited), or build the image from a parent with ${k} ${String(own)}`,
          });
        }
        node[k] = p![k];
        break;
      case "merge":
        node[k] = merge(row, p![k], own);
        break;
      default:
        node[k] = row.merge ? merge(row, resolveValue(row, undefined), own) : resolveValue(row, own);
    }
  }
  return node as NodeSpec;
}

const merge = (row: OptionRow, base: unknown, own: unknown): unknown => (row.merge as (b: unknown, o: unknown) => unknown)(base, own);
