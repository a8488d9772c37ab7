/** The details panel of one image: what it is, why it would (or would not) be rebaked, its bake log. */
import { useEffect, useRef, useState } from "preact/hooks";
import { keyPrefix } from "../../src/graph/layout.ts";
import { ApiError, type Change, type ImageInfo, type WhyResponse } from "./api.ts";
import { ErrorNote } from "./error-note.tsx";
import { shortValue, timeAgo } from "./format.ts";
import { useNow, useSession } from "./hooks.ts";

type Loaded<T> = { value: T } | { error: ApiError } | null;

/** GETs `path` once per `path` (and again when `version` changes). */
function useFetch<T>(path: string, version: unknown, get: (path: string) => Promise<T>): Loaded<T> {
  const [state, setState] = useState<Loaded<T>>(null);
  useEffect(() => {
    let live = true;
    get(path).then(
      (value) => live && setState({ value }),
      (e: unknown) => live && setState({ error: e instanceof ApiError ? e : new ApiError(String(e), 0) }),
    );
    return () => {
      live = false;
    };
  }, [path, version]);
  return state;
}

export function ImageDetails({ image, onClose }: { image: ImageInfo; onClose: () => void }) {
  const { api } = useSession();
  const base = `/v1/images/${encodeURIComponent(image.name)}`;
  // Fetched again when the image's key or bake state changes.
  const version = `${image.key}|${image.cached}|${image.build?.status}|${image.build?.updatedAt}`;
  const why = useFetch<WhyResponse>(`${base}/why`, version, (p) => api.json(p));
  const log = useFetch<string>(`${base}/log`, version, (p) => api.text(p));
  const heading = useRef<HTMLHeadingElement>(null);

  useEffect(() => {
    heading.current?.focus();
  }, [image.name]);
  useEffect(() => {
    const onKey = (e: KeyboardEvent) => {
      if (e.key === "Escape" && !document.querySelector("dialog[open]")) onClose();
    };
    document.addEventListener("keydown", onKey);
    return () => document.removeEventListener("keydown", onKey);
  }, [onClose]);

  return (
    <aside class="details" aria-label="Image details">
      <div class="details-head">
        <h3 ref={heading} tabIndex={-1}>
          {image.name}
        </h3>
        <button type="button" onClick={onClose} aria-label="Close image details">
          Close
        </button>
      </div>
      <dl class="facts">
        {image.ref && (
          <>
            <dt>Image</dt>
            <dd>
              <code>{image.ref}</code>
            </dd>
          </>
        )}
        {image.module && (
          <>
            <dt>Module</dt>
            <dd>
              <code>{image.module}</code>
            </dd>
          </>
        )}
        <dt>Parent</dt>
        <dd>{image.parent ?? "none"}</dd>
        <dt>Pools</dt>
        <dd>{image.pools.length ? image.pools.join(", ") : "none"}</dd>
        <dt>Key</dt>
        <dd>
          <code class="key">{image.key ?? "not computed yet"}</code>
        </dd>
        {image.build?.error && (
          <>
            <dt>Last error</dt>
            <dd class="error-text">{image.build.error}</dd>
          </>
        )}
      </dl>
      <h4>Why</h4>
      {why === null && <p class="muted">Loading…</p>}
      {why && "error" in why && <ErrorNote error={why.error} />}
      {why && "value" in why && <Why why={why.value} />}
      <h4>Bake log</h4>
      {log === null && <p class="muted">Loading…</p>}
      {log && "error" in log && (log.error.status === 404 ? <p class="muted">No bake log kept for this image</p> : <ErrorNote error={log.error} />)}
      {log && "value" in log && (
        <pre class="log" tabIndex={0} aria-label={`Bake log of ${image.name}`}>
          {log.value}
        </pre>
      )}
    </aside>
  );
}

function Why({ why }: { why: WhyResponse }) {
  const now = useNow(10_000);
  return (
    <div class="why">
      {why.cached ? (
        <p>Baked with its current key: nothing changed</p>
      ) : why.lastBake === null ? (
        <p>Never baked here</p>
      ) : (
        <>
          <p>Would be rebaked</p>
          <Changes changes={why.changes} />
        </>
      )}
      {why.lastRebake && (
        <>
          <p>
            Rebaked {timeAgo(why.lastRebake.at, now)}: <code>{keyPrefix(why.lastRebake.from)}</code> → <code>{keyPrefix(why.lastRebake.to)}</code>
          </p>
          <Changes changes={why.lastRebake.changes} />
        </>
      )}
    </div>
  );
}

function Changes({ changes }: { changes: Change[] }) {
  if (changes.length === 0) return null;
  return (
    <ul class="changes">
      {changes.map((c) => (
        <li key={c.input}>
          <span class="input">{c.input}</span>: <code>{shortValue(c.before)}</code> → <code>{shortValue(c.after)}</code>
        </li>
      ))}
    </ul>
  );
}
