// Rewrites the options tables of docs/api.md from the option table (src/schema/options.ts), between
// their markers. Run after `npm run build` (it reads dist/); test/unit/option-table.test.ts fails
// when the committed tables differ from what this writes.
import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const { withOptionsTables } = await import(join(root, "dist/src/schema/options-doc.js"));
const file = join(root, "docs/api.md");
const next = withOptionsTables(readFileSync(file, "utf8"), "docs/api.md");
writeFileSync(file + ".tmp", next);
renameSync(file + ".tmp", file);
console.log("docs/api.md: options tables written");
