// Every relative link of the README and docs/ leads somewhere: the file exists, and an anchor
// (`file.md#section`, `#section`) names a heading of it (GitHub's slugs). Links in code blocks and
// to other sites are not checked.
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { describe, expect, it } from "vitest";

const root = join(import.meta.dirname, "..", "..");
const docs = ["README.md", ...readdirSync(join(root, "docs")).filter((f) => f.endsWith(".md")).map((f) => `docs/${f}`)];

/** The text outside fenced code blocks. */
const prose = (text: string) => text.replace(/^```[\s\S]*?^```/gm, "");

/** GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to dashes. */
export const slug = (heading: string) =>
  heading
    .trim()
    .toLowerCase()
    .replace(/`/g, "")
    .replace(/[^\p{L}\p{N} _-]/gu, "")
    .replace(/ /g, "-");

const anchors = (file: string) => new Set([...prose(readFileSync(file, "utf8")).matchAll(/^#{1,6} (.+)$/gm)].map((m) => slug(m[1]!)));

export function brokenLinks(doc: string, text: string): string[] {
  const bad: string[] = [];
  for (const m of prose(text).matchAll(/\]\(([^)\s]+)\)/g)) {
    const target = m[1]!;
    if (/^[a-z]+:/.test(target)) continue;
    const [path, anchor] = target.split("#") as [string, string | undefined];
    const file = path ? join(dirname(join(root, doc)), path) : join(root, doc);
    if (!existsSync(file)) bad.push(`${doc}: ${target}: no such file`);
    else if (anchor && file.endsWith(".md") && !anchors(file).has(anchor)) bad.push(`${doc}: ${target}: no heading #${anchor} in ${relative(root, file)}`);
  }
  return bad;
}

describe("links of the README and docs/", () => {
  it("all resolve", () => {
    expect(docs.flatMap((d) => brokenLinks(d, readFileSync(join(root, d), "utf8")))).toEqual([]);
  });

  it("would catch a missing file or heading", () => {
    expect(slug("Deadlines, cancellation, errors")).toBe("deadlines-cancellation-errors");
    expect(brokenLinks("docs/x.md", "[a](nope.md) [b](api.md#not-a-heading) [c](api.md#images) `[d](ignored.md)`\n```\n[e](in-code.md)\n```")).toEqual([
      "docs/x.md: nope.md: no such file",
      "docs/x.md: api.md#not-a-heading: no heading #not-a-heading in docs/api.md",
      "docs/x.md: ignored.md: no such file",
    ]);
  });
});
