/** Light or dark: the user's choice (localStorage) or else the system's, as `data-theme` on <html>. */
export type Theme = "light" | "dark";

const STORAGE = "supermachine.theme";

export function initialTheme(): Theme {
  const saved = localStorage.getItem(STORAGE);
  if (saved === "light" || saved === "dark") return saved;
  return matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
}

export function applyTheme(theme: Theme, remember: boolean): void {
  document.documentElement.dataset.theme = theme;
  if (remember) localStorage.setItem(STORAGE, theme);
}
