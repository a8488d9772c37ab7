/**
 * `supermachine init --template <name> [dir]`: copies a project template (`templates/<name>/` in
 * this package: a supermachine.config.ts, image modules, helpers, README.md, package.json and
 * tsconfig.json) into dir. Existing files are never overwritten without `--force`.
 */
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { basename, join, relative, resolve, sep } from "node:path";
import type { Command } from "commander";
import { packageRoot } from "../engine/artifacts.js";
import { SupermachineError } from "../errors.js";
import { action, isJson, UsageError, writeJson } from "./common.js";

export const INIT_ERROR_CODES = ["INIT_FILES_EXIST", "INIT_NOT_A_DIRECTORY", "INIT_UNKNOWN_TEMPLATE"] as const;
export type InitErrorCode = (typeof INIT_ERROR_CODES)[number];
/** `init` could not create the project. */
export class InitError extends SupermachineError<InitErrorCode> {}

/**
 * Files stored under another name in a template: npm leaves `.gitignore` out of published
 * packages (and may rename it), so templates keep it as `gitignore`.
 */
const RENAMED: Record<string, string> = { gitignore: ".gitignore" };

export interface TemplateInfo {
  name: string;
  description: string;
  dir: string;
  /** Paths relative to the template, as written into a project. */
  files: string[];
}

export function templatesDir(): string {
  return join(packageRoot(), "templates");
}

/** Every template (a directory of templates/ holding a supermachine.config.ts), by name. */
export function listTemplates(root = templatesDir()): TemplateInfo[] {
  let names: string[];
  try {
    names = readdirSync(root).sort();
  } catch {
    return [];
  }
  const out: TemplateInfo[] = [];
  for (const name of names) {
    const dir = join(root, name);
    if (!statSync(dir).isDirectory() || !existsSync(join(dir, "supermachine.config.ts"))) continue;
    let description = "";
    try {
      description = (JSON.parse(readFileSync(join(dir, "package.json"), "utf8")) as { description?: string }).description ?? "";
    } catch {
      /* no description */
    }
    out.push({ name, description, dir, files: walk(dir).map(target).sort() });
  }
  return out;
}

/** Files under dir, relative, sorted (node_modules and snapshots of a template tried in place are skipped). */
function walk(dir: string, base = dir): string[] {
  const out: string[] = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    if (entry.name === "node_modules" || entry.name === ".snapshots") continue;
    const p = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...walk(p, base));
    else if (entry.isFile()) out.push(relative(base, p));
  }
  return out.sort();
}

/** The path a template file gets in the project. */
function target(rel: string): string {
  const parts = rel.split(sep);
  const last = parts.pop()!;
  return [...parts, RENAMED[last] ?? last].join(sep);
}

export interface InitResult {
  template: string;
  dir: string;
  /** Files written, relative to dir. */
  files: string[];
  /** Those of them that existed and were overwritten (--force). */
  overwritten: string[];
  next: string[];
}

/** Copies template `name` into `dir`. Throws InitError when files exist (unless force) or the name is unknown. */
export function initProject(name: string, dir: string, opts: { force?: boolean; root?: string } = {}): InitResult {
  const templates = listTemplates(opts.root);
  const template = templates.find((t) => t.name === name);
  if (!template) {
    throw new InitError("INIT_UNKNOWN_TEMPLATE", `no template named ${JSON.stringify(name)}`, {
      hint: `templates: ${templates.map((t) => t.name).join(", ") || "(none)"} (supermachine init --list describes them)`,
    });
  }
  const dest = resolve(dir);
  if (existsSync(dest) && !statSync(dest).isDirectory()) {
    throw new InitError("INIT_NOT_A_DIRECTORY", `${dest} exists and is not a directory`, { hint: "give init a directory (it is created when missing)" });
  }
  const sources = walk(template.dir);
  const existing = sources.map(target).filter((f) => existsSync(join(dest, f)));
  if (existing.length && !opts.force) {
    throw new InitError("INIT_FILES_EXIST", `init --template ${name}: ${existing.length === 1 ? "a file of the template already exists" : `${existing.length} files of the template already exist`} in ${dest}: ${existing.join(", ")}`, {
      hint: "init into an empty directory (supermachine init --template <name> <dir>), or pass --force to overwrite them",
    });
  }
  for (const rel of sources) {
    const to = join(dest, target(rel));
    mkdirSync(join(to, ".."), { recursive: true });
    if (rel === "package.json") writeFileSync(to, packageJson(join(template.dir, rel), dest));
    else copyFileSync(join(template.dir, rel), to);
  }
  const next = [
    ...(resolve(dest) === resolve(process.cwd()) ? [] : [`cd ${relative(process.cwd(), dest) || "."}`]),
    "npm install                  # supermachine, and TypeScript for your editor",
    "npx supermachine build       # bake the images (the first time pulls and boots them)",
    "npx supermachine ls          # keys, parents, cached, sizes",
    "node main.mjs                # a program using loadPools()",
  ];
  return { template: name, dir: dest, files: sources.map(target).sort(), overwritten: existing.sort(), next };
}

/** The template's package.json, named after the project's directory and requiring this version. */
function packageJson(src: string, dest: string): string {
  const pj = JSON.parse(readFileSync(src, "utf8")) as { name?: string; dependencies?: Record<string, string> };
  const name = basename(dest).toLowerCase().replace(/[^a-z0-9._-]+/g, "-").replace(/^[._-]+/, "");
  if (name) pj.name = name;
  const own = (JSON.parse(readFileSync(join(packageRoot(), "package.json"), "utf8")) as { version?: string }).version;
  if (own && pj.dependencies?.supermachine) pj.dependencies.supermachine = `^${own}`;
  return JSON.stringify(pj, null, 2) + "\n";
}

export function registerInitCommand(program: Command): void {
  program
    .command("init")
    .helpGroup("Projects:")
    .summary("start a project from a template")
    .description("Copy a project template (config, image modules, helpers, README, package.json, tsconfig.json) into dir. Existing files are not overwritten unless --force.")
    .argument("[dir]", "where to create the project (created when missing)", ".")
    .option("-t, --template <name>", "the template to copy (see --list)")
    .option("--list", "list the templates")
    .option("--force", "overwrite files of the template that already exist in dir")
    .addHelpText("after", "\nExamples:\n  supermachine init --list\n  supermachine init --template python-sandbox my-sandbox")
    .action(action(init));
}

async function init(dir: string, o: { template?: string; list?: boolean; force?: boolean }, cmd: Command): Promise<number> {
  const json = isJson(cmd);
  if (o.list) {
    const templates = listTemplates();
    if (json) writeJson({ templates: templates.map(({ name, description, files }) => ({ name, description, files })) }, true);
    else {
      const w = Math.max(...templates.map((t) => t.name.length));
      for (const t of templates) process.stdout.write(`${t.name.padEnd(w)}  ${t.description}\n`);
    }
    return 0;
  }
  if (!o.template) throw new UsageError(`init: --template <name> is required (templates: ${listTemplates().map((t) => t.name).join(", ")})`);
  const r = initProject(o.template, dir, { ...(o.force ? { force: true } : {}) });
  if (json) {
    writeJson(r, true);
    return 0;
  }
  process.stdout.write(`Created a ${r.template} project in ${r.dir}:\n`);
  for (const f of r.files) process.stdout.write(`  ${f}${r.overwritten.includes(f) ? "  (overwritten)" : ""}\n`);
  process.stdout.write(`\nNext steps (README.md explains the layout and the commands):\n`);
  for (const step of r.next) process.stdout.write(`  ${step}\n`);
  return 0;
}
