/** The web page of `supermachine serve`: mounts the app over the loading placeholder. */
import { render } from "preact";
import { App } from "./app.tsx";
import { applyTheme, initialTheme } from "./theme.ts";

applyTheme(initialTheme(), false);
const root = document.getElementById("app")!;
root.textContent = "";
render(<App />, root);
