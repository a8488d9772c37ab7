/** The form that asks for an API key before anything else is shown. */
import { useState } from "preact/hooks";
import { ApiError, checkKey } from "./api.ts";
import { ErrorNote } from "./error-note.tsx";

export function KeyGate({ message, onKey }: { message: string | null; onKey: (key: string) => void }) {
  const [key, setKey] = useState("");
  const [error, setError] = useState<{ message: string; hint: string | null } | null>(message ? { message, hint: null } : null);
  const [checking, setChecking] = useState(false);

  const submit = async (e: Event) => {
    e.preventDefault();
    const candidate = key.trim();
    if (candidate === "") {
      setError({ message: "Enter an API key.", hint: null });
      return;
    }
    setChecking(true);
    try {
      await checkKey(candidate);
      onKey(candidate);
    } catch (err) {
      setError(err instanceof ApiError ? { message: err.message, hint: err.hint } : { message: String(err), hint: null });
    } finally {
      setChecking(false);
    }
  };

  return (
    <main id="main" class="gate" tabIndex={-1}>
      <h1>supermachine</h1>
      <form class="gate-form" onSubmit={submit} aria-labelledby="gate-title">
        <h2 id="gate-title">Sign in</h2>
        <label for="api-key">API key</label>
        <input id="api-key" name="api-key" type="password" autocomplete="off" required value={key} onInput={(e) => setKey(e.currentTarget.value)} aria-describedby="gate-help" />
        <p id="gate-help" class="muted">
          Keys come from <code>supermachine keys create</code> on the server's host.
        </p>
        <ErrorNote error={error} />
        <button type="submit" class="primary" disabled={checking}>
          {checking ? "Checking…" : "Sign in"}
        </button>
      </form>
    </main>
  );
}
