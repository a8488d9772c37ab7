/** Hash routing between the views: #graph (the default), #pools, #sandboxes, #events. */
import { useEffect, useState } from "preact/hooks";

export const VIEWS = [
  { id: "graph", label: "Graph" },
  { id: "pools", label: "Pools" },
  { id: "sandboxes", label: "Sandboxes" },
  { id: "events", label: "Events" },
] as const;

export type ViewId = (typeof VIEWS)[number]["id"];

const current = (): ViewId => VIEWS.find((v) => `#${v.id}` === location.hash)?.id ?? "graph";

export function useView(): ViewId {
  const [view, setView] = useState(current);
  useEffect(() => {
    const onHash = () => setView(current());
    addEventListener("hashchange", onHash);
    return () => removeEventListener("hashchange", onHash);
  }, []);
  return view;
}
