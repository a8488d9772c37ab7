/** The modal that confirms killing a sandbox, then sends the DELETE. */
import { useEffect, useRef, useState } from "preact/hooks";
import { ApiError } from "./api.ts";
import { ErrorNote } from "./error-note.tsx";
import { useSession } from "./hooks.ts";

export function ConfirmKill({ id, onCancel, onKilled }: { id: string; onCancel: () => void; onKilled: (id: string) => void }) {
  const { api } = useSession();
  const dialog = useRef<HTMLDialogElement>(null);
  const cancel = useRef<HTMLButtonElement>(null);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<ApiError | null>(null);
  const done = useRef<(() => void) | null>(null);

  useEffect(() => {
    const d = dialog.current!;
    d.showModal();
    cancel.current?.focus();
    return () => {
      if (d.open) d.close();
    };
  }, []);

  // Closing the dialog (Cancel, Escape, or after the kill) hands focus back, then reports.
  const close = (then: () => void) => {
    done.current = then;
    dialog.current?.close();
  };
  const onClose = () => (done.current ?? onCancel)();

  const kill = async () => {
    setBusy(true);
    setError(null);
    try {
      await api.delete(`/v1/sandboxes/${encodeURIComponent(id)}`);
      close(() => onKilled(id));
    } catch (err) {
      // Gone already: what the user wanted.
      if (err instanceof ApiError && err.status === 404) close(() => onKilled(id));
      else setError(err instanceof ApiError ? err : new ApiError(String(err), 0));
    } finally {
      setBusy(false);
    }
  };

  return (
    <dialog ref={dialog} class="confirm" aria-labelledby="confirm-title" aria-describedby="confirm-text" onClose={onClose}>
      <h2 id="confirm-title">Kill sandbox</h2>
      <p id="confirm-text">
        Kill sandbox <code>{id}</code>? Its VM is released and everything in it is lost.
      </p>
      <ErrorNote error={error} />
      <div class="actions">
        <button type="button" ref={cancel} onClick={() => close(onCancel)}>
          Cancel
        </button>
        <button type="button" class="danger" disabled={busy} onClick={kill}>
          Kill
        </button>
      </div>
    </dialog>
  );
}
