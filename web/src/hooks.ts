/** Hooks the views share: the API client, the event stream, polling and a ticking clock. */
import { createContext } from "preact";
import { useContext, useEffect, useRef, useState } from "preact/hooks";
import { ApiError, type Api, type ServerEvent } from "./api.ts";

export interface Session {
  api: Api;
  /** Calls `fn` for each event the stream delivers from now on; returns the unsubscribe. */
  subscribe(fn: (event: ServerEvent) => void): () => void;
}

export const SessionContext = createContext<Session | null>(null);

export function useSession(): Session {
  const s = useContext(SessionContext);
  if (!s) throw new Error("useSession outside a signed-in dashboard");
  return s;
}

/** Runs `fn` on each event of the stream (the latest `fn`, without resubscribing). */
export function useEvents(fn: (event: ServerEvent) => void): void {
  const { subscribe } = useSession();
  const latest = useRef(fn);
  latest.current = fn;
  useEffect(() => subscribe((e) => latest.current(e)), [subscribe]);
}

export interface Polled<T> {
  data: T | null;
  error: ApiError | null;
  /** Fetches now (for example after an event said the data changed). */
  refresh(): void;
}

/** GETs `path` now and every `everyMs`, keeping the last answer and the last error. */
export function usePoll<T>(path: string, everyMs: number): Polled<T> {
  const { api } = useSession();
  const [data, setData] = useState<T | null>(null);
  const [error, setError] = useState<ApiError | null>(null);
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let live = true;
    api.json<T>(path).then(
      (d) => {
        if (!live) return;
        setData(d);
        setError(null);
      },
      (e: unknown) => live && setError(e instanceof ApiError ? e : new ApiError(String(e), 0)),
    );
    const timer = setTimeout(() => setTick((t) => t + 1), everyMs);
    return () => {
      live = false;
      clearTimeout(timer);
    };
  }, [api, path, everyMs, tick]);
  const refresh = useRef(() => setTick((t) => t + 1)).current;
  return { data, error, refresh };
}

/** The current time, updated every `everyMs`. */
export function useNow(everyMs = 1000): number {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const timer = setInterval(() => setNow(Date.now()), everyMs);
    return () => clearInterval(timer);
  }, [everyMs]);
  return now;
}
