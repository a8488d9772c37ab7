/** The event stream, newest first, with a filter by kind. */
import { useState } from "preact/hooks";
import type { EventKind, ServerEvent } from "./api.ts";
import { describeEvent, isFailure } from "./describe-event.ts";
import { clockTime } from "./format.ts";

const KINDS: EventKind[] = ["bake", "watch", "sandbox", "error"];

/** An event as the page keeps it: `seq` counts the events this tab received. */
export interface LoggedEvent {
  seq: number;
  event: ServerEvent;
}

export function EventsView({ events }: { events: LoggedEvent[] }) {
  const [shown, setShown] = useState<ReadonlySet<EventKind>>(new Set(KINDS));
  const toggle = (kind: EventKind) =>
    setShown((s) => {
      const next = new Set(s);
      if (!next.delete(kind)) next.add(kind);
      return next;
    });
  const visible = events.filter(({ event }) => shown.has(event.kind));
  return (
    <section class="view" aria-labelledby="events-title">
      <h2 id="events-title">Events</h2>
      <fieldset class="filters">
        <legend>Show</legend>
        {KINDS.map((k) => (
          <label key={k}>
            <input type="checkbox" checked={shown.has(k)} onChange={() => toggle(k)} /> {k}
          </label>
        ))}
      </fieldset>
      {visible.length === 0 && <p class="empty">{events.length === 0 ? "No events yet" : "No events of the kinds shown"}</p>}
      <div role="log" aria-live="polite" aria-label="Events, newest first">
        <ol class="events">
          {visible.map(({ seq, event: e }) => (
            <li key={seq} data-kind={e.kind} data-type={e.type} class={isFailure(e) ? "failure" : undefined}>
              <time dateTime={e.at}>{clockTime(e.at)}</time>
              <span class={`badge kind-${e.kind}`}>{e.kind}</span>
              <span class="text">{describeEvent(e)}</span>
            </li>
          ))}
        </ol>
      </div>
    </section>
  );
}
