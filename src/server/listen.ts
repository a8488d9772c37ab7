/** `--listen host:port` (serve and its front). */
import { ServerError } from "./errors.js";

export function parseListen(listen: string): { host: string; port: number } {
  const m = listen.match(/^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/) ?? listen.match(/^()()(\d{1,5})$/);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) {
    throw new ServerError("SERVER_BAD_REQUEST", `--listen ${JSON.stringify(listen)} is not host:port`, { hint: "for example --listen 127.0.0.1:8080, or 0.0.0.0:8080 to serve other hosts (put TLS in front)" });
  }
  return { host: m[1] || m[2] || "127.0.0.1", port };
}
