/**
 * The fuzzer's oracle: runs one input through every `sip/` entry point a stage calls on untrusted
 * bytes and returns what went wrong, or null. Checks that nothing throws, that results have a sane
 * shape (`ok: false` carries a reason and a status of 400, 416 or 505), that the stream framer cuts
 * the same messages however the stream is chunked, and that a quick response is never much larger
 * than its request.
 *
 * @module
 */

import { scanFirstLine } from "../sip/first_line.ts";
import { type FrameItem, StreamFramer } from "../sip/frame.ts";
import {
  aorOf,
  header,
  headerAll,
  parseContacts,
  parseCSeq,
  parseExpires,
  parseNameAddr,
  parseUri,
  parseVia,
  tagOf,
  uriKey,
} from "../sip/headers.ts";
import type { SipMessage } from "../sip/message.ts";
import { parseMessage } from "../sip/parse.ts";
import { quickResponse } from "../sip/serialize.ts";
import type { Rng } from "./prng.ts";
import { toBinary } from "./mutate.ts";

/** A failed check: which one, and what it saw. */
export interface Failure {
  /** Short stable signature, used to group inputs that fail the same way. */
  readonly kind: string;
  readonly detail: string;
}

/** Thrown by a check to report a broken invariant (as opposed to a crash in the code under test). */
class Broken extends Error {
  constructor(readonly kind: string, detail: string) {
    super(detail);
  }
}

function expect(cond: boolean, kind: string, detail: string): void {
  if (!cond) throw new Broken(kind, detail);
}

const STATUSES = new Set([400, 416, 505]);

/** Time spent inside the code under test for the current input (oracle work excluded), in ms. */
let sutMs = 0;

function timed<T>(fn: () => T): T {
  const t = performance.now();
  try {
    return fn();
  } finally {
    sutMs += performance.now() - t;
  }
}

/** Checks an `{ ok: false }` value has a reason and a status a server can send. */
function checkError(r: unknown, where: string): void {
  const e = r as { ok: false; reason?: unknown; status?: unknown; header?: unknown };
  expect(
    typeof e.reason === "string" && e.reason.length > 0,
    `${where}:no-reason`,
    String(e.reason),
  );
  expect(
    typeof e.status === "number" && STATUSES.has(e.status),
    `${where}:bad-status`,
    String(e.status),
  );
  expect(
    e.header === undefined || typeof e.header === "string",
    `${where}:bad-header-field`,
    String(e.header),
  );
  expect(
    !/[\r\n]/.test(e.reason as string),
    `${where}:reason-has-crlf`,
    JSON.stringify(e.reason),
  );
}

/** Runs the typed header decoders a registrar uses over a parsed message. */
function decodeHeaders(msg: SipMessage): void {
  for (const v of headerAll(msg, "via")) {
    const r = parseVia(v);
    if (!r.ok) checkError(r, "parseVia");
    else {
      expect(r.value.port === null || (r.value.port >= 0 && r.value.port <= 65535), "via:port", v);
      expect(r.value.host.length > 0, "via:empty-host", v);
    }
  }
  for (const name of ["from", "to"]) {
    const v = header(msg, name);
    if (v === undefined) continue;
    tagOf(v);
    const na = parseNameAddr(v, name === "to" ? "To" : "From");
    if (!na.ok) checkError(na, "parseNameAddr");
    else decodeUri(na.value.uri);
  }
  const contacts = parseContacts(msg);
  if (!contacts.ok) checkError(contacts, "parseContacts");
  else if (!contacts.value.star) {
    for (const c of contacts.value.contacts) {
      decodeUri(c.uri);
      const e = c.params.get("expires");
      if (e !== undefined && e !== null) checkExpires(e);
    }
  }
  const cseq = header(msg, "cseq");
  if (cseq !== undefined) {
    const r = parseCSeq(cseq);
    if (!r.ok) checkError(r, "parseCSeq");
    else {
      expect(
        Number.isInteger(r.value.seq) && r.value.seq >= 0 && r.value.seq <= 0x7fffffff,
        "cseq:range",
        cseq,
      );
    }
  }
  const exp = header(msg, "expires");
  if (exp !== undefined) checkExpires(exp);
  if (msg.kind === "request") decodeUri(msg.uri);
}

function checkExpires(v: string): void {
  const e = parseExpires(v);
  expect(
    e === null || (Number.isInteger(e) && e >= 0 && e <= 0xffffffff),
    "expires:range",
    v,
  );
}

function decodeUri(text: string): void {
  const r = parseUri(text);
  if (!r.ok) return checkError(r, "parseUri");
  const u = r.value;
  expect(u.port === null || (u.port >= 0 && u.port <= 65535), "uri:port", text);
  const key = uriKey(u);
  const aor = aorOf(u);
  expect(typeof key === "string" && key.length > 0, "uri:key", text);
  expect(typeof aor === "string" && aor.length > 0, "uri:aor", text);
}

function checkParse(input: Uint8Array): void {
  const r = timed(() => parseMessage(input));
  if (!r.ok) {
    checkError(r, "parseMessage");
    return;
  }
  const m = r.value;
  expect(m.body.length <= input.length, "parse:body-size", String(m.body.length));
  for (const h of m.headers) {
    expect(h.name.length > 0 && h.name === h.name.toLowerCase(), "parse:header-name", h.name);
  }
  if (m.kind === "request") {
    // deno-lint-ignore no-control-regex
    expect(m.method.length > 0 && !/[\x00-\x20\x7f]/.test(m.uri), "parse:request-line", m.uri);
    // classify reads the first line only: it must agree with a full parse on what a request is.
    const line = scanFirstLine(input);
    expect(
      line.kind === "request" && line.method === m.method,
      "scan:disagrees-with-parse",
      `${line.kind} vs ${m.method}`,
    );
  } else {
    expect(m.status >= 100 && m.status <= 999, "parse:status", String(m.status));
  }
  timed(() => decodeHeaders(m));
}

function checkScan(input: Uint8Array): void {
  const line = timed(() => scanFirstLine(input));
  if (line.kind === "response") {
    expect(line.status >= 100 && line.status <= 999, "scan:status", String(line.status));
  } else if (line.kind === "request") {
    expect(line.method.length > 0, "scan:method", "");
  }
}

/** The quick response must not amplify: at most twice the request plus a fixed allowance. */
export const QUICK_SLACK = 256;

function checkQuick(input: Uint8Array): void {
  const out = timed(() =>
    quickResponse(input, 400, "Bad Request", [["Retry-After", "5"]], "abc123")
  );
  if (out === null) return;
  expect(
    out.length <= input.length * 2 + QUICK_SLACK,
    "quick:amplifies",
    `${out.length} from ${input.length}`,
  );
  const head = toBinary(out.subarray(0, 25));
  expect(head.startsWith("SIP/2.0 400 Bad Request\r\n"), "quick:status-line", head);
  const tail = toBinary(out.subarray(out.length - 4));
  expect(tail === "\r\n\r\n", "quick:end", JSON.stringify(tail));
}

type Cut = { type: string; bytes?: string; reason?: string };

function frameAll(chunks: Uint8Array[], max: number): Cut[] {
  const f = new StreamFramer({ maxMessageSize: max, now: () => 1 });
  const items: FrameItem[] = [];
  let pushed = 0;
  // Timed as a whole (a clock read per push would cost more than the push); the checks inside are
  // a few getter reads.
  const t = performance.now();
  for (const c of chunks) {
    pushed += c.length;
    for (const item of f.push(c)) items.push(item);
    if (f.bufferedBytes > max) {
      throw new Broken("frame:buffer-over-max", `${f.bufferedBytes} > ${max}`);
    }
    if (f.bufferedBytes !== 0 && f.pendingSince === 0) {
      throw new Broken("frame:pending-without-since", String(f.bufferedBytes));
    }
    if (f.failed && f.bufferedBytes !== 0) throw new Broken("frame:failed-holds-buffer", "");
  }
  sutMs += performance.now() - t;
  // Message bytes stay valid: chunks are never written to, and the framer never reuses a buffer
  // it handed out.
  const out = items.map(describe);
  let total = 0;
  for (const c of out) total += c.bytes?.length ?? 0;
  expect(total <= pushed, "frame:more-out-than-in", `${total} > ${pushed}`);
  return out;
}

function describe(item: FrameItem): Cut {
  if (item.type === "message") return { type: "message", bytes: toBinary(item.bytes) };
  if (item.type === "error") return { type: "error", reason: item.reason };
  return { type: "ping" };
}

function chunked(input: Uint8Array, rng: Rng): Uint8Array[] {
  const chunks: Uint8Array[] = [];
  let p = 0;
  const small = input.length <= 8192 && rng.chance(0.3);
  while (p < input.length) {
    const k = 1 + rng.int(small ? 8 : Math.max(2, input.length >> 1));
    // Views are fine: the framer may keep them, and nothing writes to `input` afterwards.
    chunks.push(input.subarray(p, p + k));
    p += k;
  }
  return chunks;
}

function sameCuts(a: Cut[], b: Cut[]): boolean {
  // A prefix agreement is enough where one side stopped at an error: after an error, nothing.
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!, y = b[i]!;
    if (x.type !== y.type || x.bytes !== y.bytes || x.reason !== y.reason) return false;
  }
  return true;
}

/** Limits worth trying for an input of `n` bytes framed twice over: exactly at its sizes. */
export function edgeLimits(n: number): number[] {
  return [n - 1, n, n + 1, 2 * n - 1, 2 * n, 2 * n + 1].filter((m) => m > 0);
}

function checkFrame(input: Uint8Array, rng: Rng, maxMessageSize?: number): void {
  const max = maxMessageSize ??
    (rng.chance(0.3)
      ? 64 + rng.int(2048)
      : rng.chance(0.1)
      ? rng.pick(edgeLimits(input.length))
      : 65536);
  // Twice in a row: the second copy checks the framer's state after the first message.
  const stream = new Uint8Array(input.length * 2);
  stream.set(input, 0);
  stream.set(input, input.length);
  const whole = frameAll([stream], max);
  const pieces = frameAll(chunked(stream, rng), max);
  const bytewise = stream.length <= 2048 && rng.chance(0.1)
    ? frameAll(Array.from(stream, (_, k) => stream.subarray(k, k + 1)), max)
    : null;
  expect(
    sameCuts(whole, pieces),
    "frame:chunking-changes-result",
    `${summary(whole)} vs ${summary(pieces)}`,
  );
  if (bytewise !== null) {
    expect(
      sameCuts(whole, bytewise),
      "frame:bytewise-changes-result",
      `${summary(whole)} vs ${summary(bytewise)}`,
    );
  }
  for (const c of whole) {
    if (c.type === "message") {
      const b = c.bytes!;
      expect(b.length <= max, "frame:message-over-max", String(b.length));
    }
  }
}

function summary(cuts: Cut[]): string {
  return cuts.map((c) => c.type === "message" ? `m${c.bytes!.length}` : c.reason ?? c.type).join(
    ",",
  );
}

/** Runs every check on one input; returns the first failure (or null) and the time spent in the
 * code under test. `maxMessageSize` fixes the framer's limit (else the generator picks one). */
export function checkInput(
  input: Uint8Array,
  rng: Rng,
  maxMessageSize?: number,
): { failure: Failure | null; ms: number } {
  sutMs = 0;
  const failure = runChecks(input, rng, maxMessageSize);
  return { failure, ms: sutMs };
}

function runChecks(input: Uint8Array, rng: Rng, maxMessageSize?: number): Failure | null {
  try {
    checkParse(input);
    checkScan(input);
    checkQuick(input);
    checkFrame(input, rng, maxMessageSize);
    return null;
  } catch (error) {
    if (error instanceof Broken) return { kind: error.kind, detail: error.message };
    const e = error instanceof Error ? error : new Error(String(error));
    const frame = (e.stack ?? "").split("\n").find((l) => l.includes("/sip/")) ?? "";
    const at = frame.replace(/.*\/sip\//, "sip/").replace(/\)$/, "").replace(/:\d+$/, "");
    return { kind: `throws:${e.name}:${at}`, detail: `${e.message}\n${e.stack ?? ""}` };
  }
}
