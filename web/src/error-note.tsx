/** A request's failure as the page shows it: the server's message and its hint. */
export function ErrorNote({ error }: { error: { message: string; hint?: string | null } | null }) {
  if (!error) return null;
  return (
    <div class="error-note" role="alert">
      <p>{error.message}</p>
      {error.hint && <p class="hint">{error.hint}</p>}
    </div>
  );
}
