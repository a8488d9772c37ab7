/**
 * The options tables of docs/api.md, generated from the option table (./options.ts), so the docs
 * cannot drift from what the code accepts: `npm run docs:options` rewrites them between their
 * markers, and a unit test fails when they differ from what this generates.
 */
import { buildOptions, poolOptions, type ChildRule, type OptionRow } from "./options.js";

export type OptionsScope = "build" | "pool";

export const OPTIONS_MARKERS = (scope: OptionsScope) => ({ start: `<!-- options:${scope}:start -->`, end: `<!-- options:${scope}:end -->` });

const CHILD: Record<ChildRule, string> = {
  root: "root image only",
  same: "inherited (may only repeat)",
  merge: "parent's, own on top",
  own: "own (not inherited)",
  call: "-",
};

const cell = (s: string) => s.replace(/\|/g, "\\|").replace(/\n/g, " ");

function defaultText(row: OptionRow): string {
  if (row.required) return "required";
  if (row.default === undefined) return "-";
  return "`" + JSON.stringify(row.default) + "`";
}

/** The markdown table of one scope's options (no markers). */
export function optionsTable(scope: OptionsScope): string {
  const rows = Object.entries(scope === "build" ? buildOptions : poolOptions) as [string, OptionRow][];
  const head =
    scope === "build"
      ? ["| option | type | default | in the key | in a child image | what it does |", "|---|---|---|---|---|---|"]
      : ["| option | type | default | what it does |", "|---|---|---|---|"];
  const lines = rows.map(([name, row]) => {
    const base = [`\`${name}\``, "`" + row.type + "`", defaultText(row)];
    const extra = scope === "build" ? [row.key ? (row.why ? `yes, by ${row.why === "entries" ? "entry" : "guest path"}` : "yes") : "no", CHILD[row.child ?? "own"]] : [];
    return "| " + [...base, ...extra, row.doc].map(cell).join(" | ") + " |";
  });
  return [...head, ...lines].join("\n");
}

/** `text` with each scope's table put between its markers; throws when a marker is missing. */
export function withOptionsTables(text: string, file = "docs/api.md"): string {
  let out = text;
  for (const scope of ["build", "pool"] as const) {
    const { start, end } = OPTIONS_MARKERS(scope);
    const i = out.indexOf(start);
    const j = out.indexOf(end);
    if (i < 0 || j < i) throw new Error(`${file}: the markers ${start} ... ${end} are missing or out of order`);
    out = out.slice(0, i + start.length) + "\n" + optionsTable(scope) + "\n" + out.slice(j);
  }
  return out;
}
