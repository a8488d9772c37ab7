import createDebug from "debug";

/** `DEBUG=supermachine:*` enables these; `DEBUG=supermachine:engine` one of them. */
export function logger(area: string): createDebug.Debugger {
  return createDebug(`supermachine:${area}`);
}
