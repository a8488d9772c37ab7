/** The page: the key gate, or the dashboard (header, views, the event stream) once a key is kept. */
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import { Api, type ApiError, clearKey, loadKey, type NodeInfo, saveKey, type ServerEvent, type StreamStatus } from "./api.ts";
import { EventsView, type LoggedEvent } from "./events-view.tsx";
import { GraphView } from "./graph-view.tsx";
import { type Session, SessionContext } from "./hooks.ts";
import { KeyGate } from "./key-gate.tsx";
import { PoolsView } from "./pools-view.tsx";
import { useView, VIEWS } from "./router.ts";
import { SandboxesView } from "./sandboxes-view.tsx";
import { applyTheme, initialTheme, type Theme } from "./theme.ts";

/** How many events the page keeps (newest first). */
const MAX_EVENTS = 500;

export function App() {
  const [key, setKey] = useState(loadKey);
  const [gateMessage, setGateMessage] = useState<string | null>(null);
  const signOut = (message: string | null) => {
    clearKey();
    setGateMessage(message);
    setKey(null);
  };
  if (key === null)
    return (
      <KeyGate
        message={gateMessage}
        onKey={(k) => {
          saveKey(k);
          setGateMessage(null);
          setKey(k);
        }}
      />
    );
  return <Dashboard key={key} apiKey={key} onSignOut={signOut} />;
}

function Dashboard({ apiKey, onSignOut }: { apiKey: string; onSignOut: (message: string | null) => void }) {
  const view = useView();
  const [events, setEvents] = useState<LoggedEvent[]>([]);
  const received = useRef(0);
  const [stream, setStream] = useState<StreamStatus>("connecting");
  const [node, setNode] = useState<NodeInfo | null>(null);
  const listeners = useRef(new Set<(e: ServerEvent) => void>());

  const session = useMemo<Session>(() => {
    const api = new Api(apiKey, (err: ApiError) => onSignOut(err.hint ? `${err.message} ${err.hint}` : err.message));
    const subscribe = (fn: (e: ServerEvent) => void) => {
      listeners.current.add(fn);
      return () => listeners.current.delete(fn);
    };
    return { api, subscribe };
  }, [apiKey]);

  useEffect(() => {
    const abort = new AbortController();
    void session.api.followEvents(
      abort.signal,
      (e) => {
        // Numbered here: a restarted server numbers its events from 1 again.
        const entry = { seq: ++received.current, event: e };
        setEvents((list) => [entry, ...list.slice(0, MAX_EVENTS - 1)]);
        for (const fn of listeners.current) fn(e);
      },
      setStream,
    );
    // The server's state changes (loading, ready, draining): asked again every few seconds.
    const readNode = () => void session.api.json<NodeInfo>("/v1/node").then(setNode, () => {});
    readNode();
    const timer = setInterval(readNode, 5_000);
    return () => {
      clearInterval(timer);
      abort.abort();
    };
  }, [session]);

  const mainRef = useRef<HTMLElement>(null);
  const current = VIEWS.find((v) => v.id === view)!;
  useEffect(() => {
    document.title = `${current.label} · ${node?.node.name ?? "supermachine"}`;
  }, [current, node]);

  return (
    <SessionContext.Provider value={session}>
      <a
        class="skip-link"
        href="#main"
        onClick={(e) => {
          e.preventDefault();
          mainRef.current?.focus();
        }}
      >
        Skip to main content
      </a>
      <header class="top">
        <div class="brand">
          <h1>supermachine</h1>
          {node && (
            <span class="node-name" title={`${node.node.name}: ${node.state}, supermachine ${node.node.version}`}>
              {node.node.name}
              {node.state !== "ready" && <span class="not-ready"> ({node.state}{node.reason ? `: ${node.reason}` : ""})</span>}
            </span>
          )}
        </div>
        <div class="controls">
          <span class={`stream stream-${stream}`} role="status">
            <span class="dot" aria-hidden="true" />
            {stream === "live" ? "live" : stream === "reconnecting" ? "reconnecting" : "connecting"}
          </span>
          <ThemeToggle />
          <button type="button" onClick={() => onSignOut(null)}>
            Sign out
          </button>
        </div>
        <nav aria-label="Views">
          <ul>
            {VIEWS.map((v) => (
              <li key={v.id}>
                <a href={`#${v.id}`} aria-current={v.id === view ? "page" : undefined}>
                  {v.label}
                </a>
              </li>
            ))}
          </ul>
        </nav>
      </header>
      <main id="main" ref={mainRef} tabIndex={-1}>
        {view === "graph" && <GraphView />}
        {view === "pools" && <PoolsView />}
        {view === "sandboxes" && <SandboxesView />}
        {view === "events" && <EventsView events={events} />}
      </main>
    </SessionContext.Provider>
  );
}

function ThemeToggle() {
  const [theme, setTheme] = useState<Theme>(initialTheme);
  const toggle = () => {
    const next = theme === "dark" ? "light" : "dark";
    applyTheme(next, true);
    setTheme(next);
  };
  return (
    <button type="button" aria-pressed={theme === "dark"} onClick={toggle}>
      Dark theme
    </button>
  );
}
