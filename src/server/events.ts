/**
 * What happens on a server, as one feed (`GET /v1/events`, Server-Sent Events): bakes and their
 * steps, watch rounds, sandboxes created and ended, and errors. Each event gets a number, so a
 * client that reconnects with `Last-Event-ID` gets what it missed (from the last `RECENT` kept).
 * Sandbox events and a request's errors belong to the key they concern; bakes and watch rounds are
 * the project's, seen by every key.
 */
import { randomBytes } from "node:crypto";
import { EventEmitter } from "node:events";
import type { BuildEvent, WatchEvent } from "../schema/events.js";
import type { ServerEvent, ServerEventBody } from "../schema/server-events.js";

export type { ServerEvent, ServerEventBody };
import { describeProgress } from "../project/progress.js";

/** Events kept for clients that connect or reconnect. */
export const RECENT = 500;

interface Entry {
  event: ServerEvent;
  /** The key it belongs to; undefined: every key sees it. */
  keyId: string | undefined;
}

export class ServerEvents {
  /**
   * This feed's instance, in every event's SSE id (`<instance>.<number>`): a client that comes
   * back with the id of another server's feed (the server restarted) gets everything kept.
   */
  readonly instance = randomBytes(4).toString("hex");
  private next = 1;
  private readonly recent: Entry[] = [];
  private readonly feed = new EventEmitter();
  /** The step each image's bake last reported, so progress events are sent when it changes. */
  private readonly steps = new Map<string, string>();

  constructor() {
    this.feed.setMaxListeners(0);
  }

  emit(body: ServerEventBody, keyId?: string): ServerEvent {
    const event = { ...body, id: this.next++, at: new Date().toISOString() } as ServerEvent;
    const entry = { event, keyId };
    this.recent.push(entry);
    if (this.recent.length > RECENT) this.recent.shift();
    this.feed.emit("event", entry);
    return event;
  }

  /** A build event of the project, as the feed tells it (progress only when its step changes). */
  build(e: BuildEvent): void {
    if (e.type === "start") {
      this.steps.delete(e.name);
      this.emit({ kind: "bake", type: "start", image: e.name });
    } else if (e.type === "progress") {
      const step = describeProgress(e.progress);
      if (!step || this.steps.get(e.name) === step) return;
      this.steps.set(e.name, step);
      this.emit({ kind: "bake", type: "progress", image: e.name, step });
    } else {
      this.steps.delete(e.name);
      this.emit({ kind: "bake", type: "done", image: e.name, status: e.node.status, ms: e.node.ms, key: e.node.key, error: e.node.error ? e.node.error.message : null });
    }
  }

  /** The step an image's bake is at now (undefined when it is not baking or said nothing yet). */
  stepOf(image: string): string | undefined {
    return this.steps.get(image);
  }

  /** A watch-mode event (its build events come through `build`). */
  watch(e: WatchEvent): void {
    if (e.type === "change") this.emit({ kind: "watch", type: "change", files: e.files });
    else if (e.type === "round-start") this.emit({ kind: "watch", type: "round-start", round: e.round, files: e.files });
    else if (e.type === "round-done") this.emit({ kind: "watch", type: "round-done", round: e.round.round, rekeyed: e.round.rekeyed, ms: e.round.ms });
    else if (e.type === "round-failed") this.emit({ kind: "watch", type: "round-failed", round: e.round, error: e.error.message });
  }

  /** The SSE id of an event of this feed. */
  sseId(e: ServerEvent): string {
    return `${this.instance}.${e.id}`;
  }

  /** The number of the last event a client saw, from its `Last-Event-ID` (0: another feed's, or none). */
  seenUpTo(lastEventId: string | undefined): number {
    const m = /^([0-9a-f]+)\.(\d{1,15})$/.exec(lastEventId ?? "");
    return m && m[1] === this.instance ? Number(m[2]) : 0;
  }

  /**
   * Calls `fn` with the kept events after `afterId` that `keyId` may see, then with each new one,
   * until the returned function is called.
   */
  subscribe(keyId: string, afterId: number, fn: (e: ServerEvent) => void): () => void {
    const visible = (en: Entry) => en.keyId === undefined || en.keyId === keyId;
    for (const en of this.recent) if (en.event.id > afterId && visible(en)) fn(en.event);
    const listener = (en: Entry) => {
      if (visible(en)) fn(en.event);
    };
    this.feed.on("event", listener);
    return () => this.feed.off("event", listener);
  }
}
