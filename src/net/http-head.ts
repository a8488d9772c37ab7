/**
 * HTTP/1.x message heads, as the egress proxy reads them from the guest (requests) and from the
 * outside world (responses): strict (CRLF line ends, token names, no obs-fold, no control
 * characters), bounded by the caller (the head is found in a buffer of limited size first).
 */

export interface Header {
  name: string;
  value: string;
}

export interface RequestHead {
  method: string;
  target: string;
  /** "HTTP/1.1" or "HTTP/1.0". */
  version: string;
  headers: Header[];
}

export interface ResponseHead {
  version: string;
  status: number;
  reason: string;
  headers: Header[];
}

const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
// eslint-disable-next-line no-control-regex
const FIELD_VALUE = /^[^\x00-\x08\x0a-\x1f\x7f]*$/;
// eslint-disable-next-line no-control-regex
const TARGET = /^[\x21-\x7e]+$/;

/** Where the head ends (the index just past CRLF CRLF) in `buf`, searching from `from`; -1 when not yet. */
export function headEnd(buf: Buffer, from = 0): number {
  const i = buf.indexOf("\r\n\r\n", Math.max(0, from - 3), "latin1");
  return i < 0 ? -1 : i + 4;
}

function parseHeaders(lines: string[]): Header[] | string {
  const headers: Header[] = [];
  for (const line of lines) {
    if (line.startsWith(" ") || line.startsWith("\t")) return "a folded header line (obs-fold)";
    const colon = line.indexOf(":");
    if (colon <= 0) return `a header line without a name: ${JSON.stringify(line.slice(0, 40))}`;
    const name = line.slice(0, colon);
    if (!TOKEN.test(name)) return `an invalid header name ${JSON.stringify(name.slice(0, 40))}`;
    const value = line.slice(colon + 1).replace(/^[ \t]+|[ \t]+$/g, "");
    if (!FIELD_VALUE.test(value)) return `a control character in header ${name}`;
    headers.push({ name, value });
  }
  return headers;
}

/** Splits a head (with its final CRLF CRLF) into lines; a bare LF is an error. */
function lines(head: Buffer): string[] | string {
  const text = head.toString("latin1", 0, head.length - 4);
  const ls = text.split("\r\n");
  if (ls.some((l) => l.includes("\n") || l.includes("\r"))) return "a line not ended by CRLF";
  return ls;
}

/** The request line and headers, or a sentence saying what is wrong. */
export function parseRequestHead(head: Buffer): RequestHead | string {
  const ls = lines(head);
  if (typeof ls === "string") return ls;
  const parts = ls[0]!.split(" ");
  if (parts.length !== 3) return `a request line that is not "METHOD target HTTP/1.1": ${JSON.stringify(ls[0]!.slice(0, 80))}`;
  const [method, target, version] = parts as [string, string, string];
  if (!TOKEN.test(method)) return `an invalid method ${JSON.stringify(method.slice(0, 40))}`;
  if (!TARGET.test(target)) return "an invalid request target";
  if (!/^HTTP\/[0-9]\.[0-9]$/.test(version)) return `an invalid HTTP version ${JSON.stringify(version.slice(0, 20))}`;
  const headers = parseHeaders(ls.slice(1));
  if (typeof headers === "string") return headers;
  return { method, target, version, headers };
}

/** The status line and headers, or a sentence saying what is wrong. */
export function parseResponseHead(head: Buffer): ResponseHead | string {
  const ls = lines(head);
  if (typeof ls === "string") return ls;
  const m = /^(HTTP\/1\.[01]) ([0-9]{3})(?: (.*))?$/.exec(ls[0]!);
  if (!m) return `an invalid status line ${JSON.stringify(ls[0]!.slice(0, 80))}`;
  const headers = parseHeaders(ls.slice(1));
  if (typeof headers === "string") return headers;
  return { version: m[1]!, status: Number(m[2]), reason: m[3] ?? "", headers };
}

/** Hop-by-hop headers (RFC 9110 7.6.1) and those `Connection` names; never `Content-Length` or `Transfer-Encoding` (the framing the raw relay keeps). */
export function withoutHopByHop(headers: Header[]): Header[] {
  const named = new Set<string>(["connection", "keep-alive", "te", "upgrade", "proxy-connection"]);
  for (const h of headers) {
    if (h.name.toLowerCase() === "connection") for (const t of h.value.split(",")) named.add(t.trim().toLowerCase());
  }
  named.delete("content-length");
  named.delete("transfer-encoding");
  return headers.filter((h) => {
    const n = h.name.toLowerCase();
    return !named.has(n) && !n.startsWith("proxy-");
  });
}

export function serializeHead(startLine: string, headers: Header[]): Buffer {
  return Buffer.from(`${startLine}\r\n${headers.map((h) => `${h.name}: ${h.value}\r\n`).join("")}\r\n`, "latin1");
}
