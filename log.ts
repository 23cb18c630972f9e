/**
 * Structured logging: one line per event, `key=value` fields (logfmt), to stderr. std has dropped
 * `@std/log`; this is the small stand-in the style guide asks for.
 *
 * @module
 */

/** Log levels, most severe first. */
export const LEVELS = ["error", "warn", "info", "debug"] as const;
export type LogLevel = typeof LEVELS[number];

let threshold = 2;
let fixed = "";

/** Sets the most verbose level that is written. */
export function setLogLevel(level: LogLevel): void {
  threshold = LEVELS.indexOf(level);
}

/** Adds fields written on every line, e.g. `{ worker: 1 }`. */
export function setLogContext(fields: Record<string, string | number>): void {
  fixed = Object.entries(fields).map(([k, v]) => ` ${k}=${format(v)}`).join("");
}

function format(v: unknown): string {
  const s = v instanceof Error ? v.message : String(v);
  return /^[\w.:/@\-[\]]+$/.test(s) ? s : JSON.stringify(s);
}

function write(level: number, msg: string, fields?: Record<string, unknown>): void {
  if (level > threshold) return;
  let line = `ts=${new Date().toISOString()} level=${LEVELS[level]}${fixed} msg=${format(msg)}`;
  if (fields) { for (const [k, v] of Object.entries(fields)) line += ` ${k}=${format(v)}`; }
  console.error(line);
}

/** The logger. */
export const log = {
  error: (msg: string, fields?: Record<string, unknown>): void => write(0, msg, fields),
  warn: (msg: string, fields?: Record<string, unknown>): void => write(1, msg, fields),
  info: (msg: string, fields?: Record<string, unknown>): void => write(2, msg, fields),
  debug: (msg: string, fields?: Record<string, unknown>): void => write(3, msg, fields),
};
