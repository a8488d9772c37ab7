/** The image graph: one box per image (parents above children), live bake state, a details panel. */
import { useMemo, useState } from "preact/hooks";
import { formatBytes, keyPrefix, layoutGraph, type PlacedImage } from "../../src/graph/layout.ts";
import type { ImageInfo, ImagesResponse } from "./api.ts";
import { ErrorNote } from "./error-note.tsx";
import { formatSeconds } from "./format.ts";
import { useEvents, useNow, usePoll } from "./hooks.ts";
import { ImageDetails } from "./image-details.tsx";

/** A bake the event stream says is running, ahead of the next refetch. */
interface LiveBake {
  step: string | null;
  since: number;
}

type NodeState = "cached" | "building" | "failed" | "not-baked";

/** What a box shows: three lines, and the same words as its accessible name. */
interface NodeView {
  state: NodeState;
  keyLine: string;
  status: string;
  label: string;
}

/** Wider than this, the graph keeps its size and scrolls rather than shrink its text away. */
const WIDE = 1400;

const clip = (s: string, n: number): string => (s.length > n ? `${s.slice(0, n - 1)}…` : s);

function describe(img: ImageInfo, live: LiveBake | undefined, now: number): NodeView {
  const size = formatBytes(img.sizeBytes);
  let state: NodeState;
  let status: string;
  if (live || img.build?.status === "building") {
    const step = live ? live.step : (img.build?.step ?? null);
    const since = live ? live.since : Date.parse(img.build!.updatedAt);
    state = "building";
    status = ["building", step && clip(step, 32), formatSeconds(now - since)].filter(Boolean).join(" · ");
  } else if (img.cached) [state, status] = ["cached", size ? `cached · ${size}` : "cached"];
  else if (img.build?.status === "failed") [state, status] = ["failed", "bake failed"];
  else [state, status] = ["not-baked", "not baked"];
  const keyLine = img.key ? `key ${keyPrefix(img.key)}` : "no key yet";
  // The visible lines in order, so the name read out matches what is seen.
  return { state, keyLine, status, label: `${img.name}: ${keyLine}, ${status}` };
}

/** Squeezes a text longer than `n` characters into `width`, so it still shows whole. */
const fit = (s: string, n: number, width: number) => (s.length > n ? { textLength: width, lengthAdjust: "spacingAndGlyphs" } : {});

export function GraphView() {
  const { data, error, refresh } = usePoll<ImagesResponse>("/v1/images", 15_000);
  const [live, setLive] = useState<Record<string, LiveBake>>({});
  const [selected, setSelected] = useState<string | null>(null);
  const now = useNow(1000);

  useEvents((e) => {
    if (e.kind === "bake") {
      if (e.type === "done") {
        setLive(({ [e.image]: _, ...rest }) => rest);
        refresh();
      } else {
        const step = e.type === "progress" ? e.step : null;
        setLive((m) => ({ ...m, [e.image]: { step, since: m[e.image]?.since ?? Date.parse(e.at) } }));
      }
    } else if (e.kind === "watch" && e.type === "round-done") refresh();
  });

  const images = data?.images ?? [];
  const layout = useMemo(() => layoutGraph(images), [data]);
  const byName = useMemo(() => new Map(images.map((i) => [i.name, i])), [data]);
  const close = () => {
    const name = selected;
    setSelected(null);
    if (name) document.querySelector<SVGGElement>(`[data-image="${CSS.escape(name)}"]`)?.focus();
  };

  return (
    <section class="view view-graph" aria-labelledby="graph-title">
      <h2 id="graph-title">Image graph</h2>
      {data?.project && (
        <p class="muted">
          Project <code>{data.project.config}</code>
        </p>
      )}
      <ErrorNote error={error} />
      {data && images.length === 0 && <p>No images in this project.</p>}
      <div class="graph-layout">
        {images.length > 0 && (
          <div class="graph-scroll" role="region" aria-label="Image graph, scrollable" tabIndex={0}>
            <svg class={layout.width > WIDE ? "graph wide" : "graph"} viewBox={`0 0 ${layout.width} ${layout.height}`} width={layout.width} height={layout.height} role="group" aria-label="Images, parents above children">
              <defs>
                <marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" markerHeight="8" orient="auto-start-reverse">
                  <path d="M0,0 L10,5 L0,10 z" class="arrow-head" />
                </marker>
              </defs>
              {layout.edges.map((e) => (
                <polyline key={`${e.from}>${e.to}`} class="edge" points={e.points.map((p) => `${p.x},${p.y}`).join(" ")} marker-end="url(#arrow)" />
              ))}
              {layout.images.map((p) => (
                <GraphNode key={p.name} placed={p} view={describe(byName.get(p.name)!, live[p.name], now)} selected={selected === p.name} onOpen={() => setSelected(p.name)} />
              ))}
            </svg>
          </div>
        )}
        {selected && byName.has(selected) && <ImageDetails image={byName.get(selected)!} onClose={close} />}
      </div>
    </section>
  );
}

function GraphNode({ placed, view, selected, onOpen }: { placed: PlacedImage; view: NodeView; selected: boolean; onOpen: () => void }) {
  const left = placed.x - placed.width / 2;
  const top = placed.y - placed.height / 2;
  const onKeyDown = (e: KeyboardEvent) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      onOpen();
    }
  };
  return (
    <g class={`node ${view.state}${selected ? " selected" : ""}`} data-image={placed.name} tabindex={0} role="button" aria-label={view.label} aria-expanded={selected} onClick={onOpen} onKeyDown={onKeyDown}>
      <rect x={left} y={top} width={placed.width} height={placed.height} rx="8" />
      {/* Each line ends in a space, so that the text read out has its words apart. */}
      <text x={left + 12} y={top + 20} class="node-name" {...fit(placed.name, 22, placed.width - 24)}>
        {placed.name}
        {" "}
      </text>
      <text x={left + 12} y={top + 38} class="node-key">
        {view.keyLine}
        {" "}
      </text>
      <text x={left + 12} y={top + 55} class="node-status" {...fit(view.status, 28, placed.width - 24)}>
        {view.status}
        {" "}
      </text>
    </g>
  );
}
