// The graph picture's layout (src/graph/layout.ts): parents above children, every image placed once.
import { describe, expect, it } from "vitest";
import { formatBytes, keyPrefix, layoutGraph } from "../../src/graph/layout.js";

describe("layoutGraph", () => {
  it("puts parents above their children and draws one edge per parent link", () => {
    const l = layoutGraph([
      { name: "python", parent: null },
      { name: "agent", parent: "python" },
      { name: "tools", parent: "agent" },
      { name: "lone", parent: null },
    ]);
    const at = Object.fromEntries(l.images.map((i) => [i.name, i]));
    expect(Object.keys(at).sort()).toEqual(["agent", "lone", "python", "tools"]);
    expect(at.python!.y).toBeLessThan(at.agent!.y);
    expect(at.agent!.y).toBeLessThan(at.tools!.y);
    expect(l.edges.map((e) => `${e.from}>${e.to}`).sort()).toEqual(["agent>tools", "python>agent"]);
    for (const e of l.edges) expect(e.points.length).toBeGreaterThanOrEqual(2);
    for (const i of l.images) {
      expect(i.x - i.width / 2).toBeGreaterThanOrEqual(0);
      expect(i.x + i.width / 2).toBeLessThanOrEqual(l.width);
      expect(i.y + i.height / 2).toBeLessThanOrEqual(l.height);
    }
  });

  it("draws an image whose parent is not listed as a root", () => {
    const l = layoutGraph([{ name: "child", parent: "elsewhere" }]);
    expect(l.images).toHaveLength(1);
    expect(l.edges).toEqual([]);
  });

  it("formats keys and sizes", () => {
    expect(keyPrefix(`sha256:${"ab".repeat(32)}`)).toBe("abababababab");
    expect(keyPrefix(null)).toBe("");
    expect(formatBytes(3 * 2 ** 20 + 2 ** 19)).toBe("3.5 MiB");
    expect(formatBytes(null)).toBe("");
  });
});
