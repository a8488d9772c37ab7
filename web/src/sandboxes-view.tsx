/** The sandboxes alive: a table with their clocks and a Kill button (after a confirmation). */
import { formatBytes } from "../../src/graph/layout.ts";
import { useState } from "preact/hooks";
import type { SandboxInfo } from "./api.ts";
import { ConfirmKill } from "./confirm-kill.tsx";
import { ErrorNote } from "./error-note.tsx";
import { formatSeconds } from "./format.ts";
import { useEvents, useNow, usePoll } from "./hooks.ts";

export function SandboxesView() {
  const { data, error, refresh } = usePoll<{ sandboxes: SandboxInfo[] }>("/v1/sandboxes", 2000);
  const [killed, setKilled] = useState<ReadonlySet<string>>(new Set());
  const [confirming, setConfirming] = useState<string | null>(null);
  const now = useNow(1000);
  useEvents((e) => {
    if (e.kind === "sandbox") refresh();
  });

  const rows = (data?.sandboxes ?? []).filter((s) => !killed.has(s.id));
  const onKilled = (id: string) => {
    setKilled((set) => new Set(set).add(id));
    setConfirming(null);
    refresh();
  };

  return (
    <section class="view" aria-labelledby="sandboxes-title">
      <h2 id="sandboxes-title">Sandboxes</h2>
      <ErrorNote error={error} />
      {data && rows.length === 0 && <p class="empty">No sandboxes alive</p>}
      {rows.length > 0 && (
        <div class="table-scroll" role="region" aria-labelledby="sandboxes-caption" tabIndex={0}>
          <table class="sandboxes">
            <caption id="sandboxes-caption">
              {rows.length} sandbox{rows.length === 1 ? "" : "es"} alive
            </caption>
            <thead>
              <tr>
                <th scope="col">ID</th>
                <th scope="col">Pool</th>
                <th scope="col">State</th>
                <th scope="col">Age</th>
                <th scope="col">Time left</th>
                <th scope="col" class="num">
                  Execs
                </th>
                <th scope="col" class="num">
                  Egress
                </th>
                <th scope="col">
                  <span class="visually-hidden">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {rows.map((s) => (
                <tr key={s.id} data-sandbox-id={s.id}>
                  <td data-label="ID">
                    <code>{s.id}</code>
                  </td>
                  <td data-label="Pool">{s.pool}</td>
                  <td data-label="State">{s.state}</td>
                  <td data-label="Age">{formatSeconds(now - Date.parse(s.startedAt))}</td>
                  <td data-label="Time left">{formatSeconds(Date.parse(s.endAt) - now)}</td>
                  <td data-label="Execs" class="num">
                    {s.execs}
                  </td>
                  <td data-label="Egress" class="num">
                    {formatBytes(s.egressBytes)}
                  </td>
                  <td>
                    <button type="button" class="danger" aria-label={`Kill sandbox ${s.id}`} onClick={() => setConfirming(s.id)}>
                      Kill
                    </button>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {confirming && <ConfirmKill id={confirming} onCancel={() => setConfirming(null)} onKilled={onKilled} />}
    </section>
  );
}
