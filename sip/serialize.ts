/**
 * Builds SIP messages as bytes: responses to parsed requests (RFC 3261 §8.2.6), requests for test
 * and benchmark clients, and a cheap response built from raw request bytes for overload answers.
 *
 * @module
 */

import { splitList, tagOf } from "./headers.ts";
import type { SipRequest } from "./message.ts";
import { commit, encodeMessage, putString, reserve } from "./_out.ts";

/** Lower-case header names -> canonical spelling used when writing. */
const CANONICAL: ReadonlyMap<string, string> = new Map(
  [
    "Via",
    "From",
    "To",
    "Call-ID",
    "CSeq",
    "Contact",
    "Content-Length",
    "Content-Type",
    "Content-Encoding",
    "Max-Forwards",
    "Expires",
    "Min-Expires",
    "Retry-After",
    "WWW-Authenticate",
    "Authorization",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "Authentication-Info",
    "Date",
    "Server",
    "User-Agent",
    "Allow",
    "Supported",
    "Require",
    "Unsupported",
    "Accept",
    "Path",
    "Service-Route",
    "Route",
    "Record-Route",
    "Warning",
    "Event",
    "Allow-Events",
    "Subject",
    "Timestamp",
    "Flow-Timer",
    "Session-Expires",
    "P-Associated-URI",
  ].map((n) => [n.toLowerCase(), n]),
);

/** The canonical spelling of a header name (`call-id` -> `Call-ID`); unknown names unchanged. */
export function canonicalHeaderName(name: string): string {
  return CANONICAL.get(name.toLowerCase()) ?? name;
}

/** Options of {@linkcode buildResponse}. */
export interface ResponseOptions {
  /** Tag appended to To when the request's To has none (RFC 3261 §8.2.6.2). */
  readonly toTag?: string;
  /** Extra headers, written after the copied ones, names canonicalised. */
  readonly headers?: ReadonlyArray<readonly [string, string]>;
  /** The body; Content-Length is always written. @default empty */
  readonly body?: Uint8Array;
  /** Replaces the first Via value, e.g. with `received`/`rport` added (RFC 3581). */
  readonly topVia?: string;
}

/**
 * Builds a response to `req` (RFC 3261 §8.2.6.2): the status line, every Via in order (`topVia`
 * replacing the first value), From, To (with `;tag=toTag` added when the request's To has no tag),
 * Call-ID and CSeq copied, then `opts.headers`, then Content-Length (always), then the body.
 */
export function buildResponse(
  req: SipRequest,
  status: number,
  reason: string,
  opts?: ResponseOptions,
): Uint8Array {
  let head = "SIP/2.0 " + status + " " + reason + "\r\n";
  let topVia = opts?.topVia;
  let from = "";
  let to = "";
  let callId = "";
  let cseq = "";
  for (const h of req.headers) {
    switch (h.name) {
      case "via":
        if (topVia !== undefined) {
          const rest = splitList(h.value).slice(1);
          head += "Via: " + topVia + "\r\n";
          for (const v of rest) head += "Via: " + v + "\r\n";
          topVia = undefined;
        } else {
          head += "Via: " + h.value + "\r\n";
        }
        break;
      case "from":
        if (from === "") from = "From: " + h.value + "\r\n";
        break;
      case "to":
        if (to === "") {
          const tag = opts?.toTag;
          to = tag !== undefined && tagOf(h.value) === null
            ? "To: " + h.value + ";tag=" + tag + "\r\n"
            : "To: " + h.value + "\r\n";
        }
        break;
      case "call-id":
        if (callId === "") callId = "Call-ID: " + h.value + "\r\n";
        break;
      case "cseq":
        if (cseq === "") cseq = "CSeq: " + h.value + "\r\n";
        break;
    }
  }
  head += from + to + callId + cseq;
  const extra = opts?.headers;
  if (extra !== undefined) {
    for (const [name, value] of extra) head += canonicalHeaderName(name) + ": " + value + "\r\n";
  }
  const body = opts?.body;
  head += "Content-Length: " + (body?.length ?? 0) + "\r\n\r\n";
  return encodeMessage(head, body);
}

/**
 * Serialises a request: `METHOD uri SIP/2.0`, the headers as given (names canonicalised), and
 * Content-Length when `headers` has none (so tests can send a wrong one on purpose).
 */
export function serializeRequest(
  method: string,
  uri: string,
  headers: ReadonlyArray<readonly [string, string]>,
  body?: Uint8Array,
): Uint8Array {
  let head = method + " " + uri + " SIP/2.0\r\n";
  let hasLength = false;
  for (const [name, value] of headers) {
    const n = canonicalHeaderName(name);
    if (n === "Content-Length" || n === "l") hasLength = true;
    head += n + ": " + value + "\r\n";
  }
  if (!hasLength) head += "Content-Length: " + (body?.length ?? 0) + "\r\n";
  head += "\r\n";
  return encodeMessage(head, body);
}

/** Which copied header a line starts with: 1 Via, 2 From, 3 To, 4 Call-ID, 5 CSeq, 0 another. */
function lineKind(b: Uint8Array, s: number, e: number): number {
  let c = e;
  for (let i = s; i < e; i++) {
    if (b[i] === 0x3a) {
      c = i;
      break;
    }
  }
  if (c === e) return 0;
  let ne = c;
  while (ne > s && (b[ne - 1] === 0x20 || b[ne - 1] === 0x09)) ne--;
  const len = ne - s;
  const c0 = b[s]! | 0x20;
  if (len === 1) {
    switch (c0) {
      case 0x76: // v
        return 1;
      case 0x66: // f
        return 2;
      case 0x74: // t
        return 3;
      case 0x69: // i
        return 4;
    }
    return 0;
  }
  const name = len === 2
    ? "to"
    : len === 3
    ? "via"
    : len === 4
    ? (c0 === 0x66 ? "from" : "cseq")
    : len === 7
    ? "call-id"
    : "";
  if (name === "" || name.charCodeAt(0) !== c0) return 0;
  for (let i = 1; i < len; i++) {
    if ((b[s + i]! | 0x20) !== (name.charCodeAt(i) | 0x20)) return 0;
  }
  switch (name) {
    case "via":
      return 1;
    case "from":
      return 2;
    case "to":
      return 3;
    case "call-id":
      return 4;
    default:
      return 5;
  }
}

/** Whether the To line [s, e) has a `tag=` parameter (a crude case-insensitive byte scan). */
function hasTag(b: Uint8Array, s: number, e: number): boolean {
  for (let i = s; i < e; i++) {
    if (b[i] !== 0x3b) continue;
    let j = i + 1;
    while (j < e && (b[j] === 0x20 || b[j] === 0x09)) j++;
    if (
      j + 3 < e && (b[j]! | 0x20) === 0x74 && (b[j + 1]! | 0x20) === 0x61 &&
      (b[j + 2]! | 0x20) === 0x67
    ) {
      let k = j + 3;
      while (k < e && (b[k] === 0x20 || b[k] === 0x09)) k++;
      if (b[k] === 0x3d) return true;
    }
  }
  return false;
}

/** The fixed parts of a quick response: status line, and extra headers + `Content-Length: 0` + CRLF. */
export interface QuickParts {
  readonly statusLine: Uint8Array;
  readonly tail: Uint8Array;
}

/**
 * Builds a response straight from raw request bytes, without a full parse: a line scan that copies
 * the Via (all lines), From, To, Call-ID and CSeq lines verbatim (compact names kept, folded
 * continuation lines kept), then `extra` headers and `Content-Length: 0`. With `toTag`, `;tag=...`
 * is appended to a To line that has no tag (RFC 3261 §8.2.6.2 asks for one on a final response).
 * Meant for cheap 503 answers under overload; a caller answering many keeps its
 * {@link quickParts} and calls {@link quickReply}.
 *
 * Returns null when the input is not a request or has no Via or no CSeq (nothing a client could
 * match); missing From, To or Call-ID lines are left out.
 */
export function quickResponse(
  bytes: Uint8Array,
  status: number,
  reason: string,
  extra?: ReadonlyArray<readonly [string, string]>,
  toTag?: string,
): Uint8Array | null {
  return quickReply(bytes, quickParts(status, reason, extra), toTag);
}

/** Ranges of the lines a quick response copies, as [start, end) pairs: reused, never shared. */
const ranges: number[] = [];

/** {@link quickResponse} with its fixed parts prepared. */
export function quickReply(
  bytes: Uint8Array,
  parts: QuickParts,
  toTag?: string,
): Uint8Array | null {
  const n = bytes.length;
  let p = 0;
  while (p < n && (bytes[p] === 13 || bytes[p] === 10)) p++;
  if (
    p + 4 > n ||
    (bytes[p] === 0x53 && bytes[p + 1] === 0x49 && bytes[p + 2] === 0x50 && bytes[p + 3] === 0x2f)
  ) {
    return null;
  }
  // Each range ends just before its line's CRLF.
  ranges.length = 0;
  let seen = 0;
  let toRange = -1;
  let copying = false;
  let size = 0;
  let ls = nextLine(bytes, p);
  while (ls < n) {
    const c0 = bytes[ls];
    if (c0 === 13 || c0 === 10) break; // the empty line ending the headers
    const next = nextLine(bytes, ls);
    let le = next;
    if (bytes[le - 1] === 10) le--;
    if (bytes[le - 1] === 13) le--;
    if (c0 === 0x20 || c0 === 0x09) {
      if (copying) {
        size += le - ranges[ranges.length - 1]!;
        ranges[ranges.length - 1] = le;
      }
    } else {
      // Only names starting with v, f, t, i or c can be copied: skip the rest cheaply.
      const f = c0! | 0x20;
      const kind = f === 0x76 || f === 0x66 || f === 0x74 || f === 0x69 || f === 0x63
        ? lineKind(bytes, ls, le)
        : 0;
      copying = kind !== 0;
      if (copying) {
        seen |= 1 << kind;
        if (kind === 3 && toRange < 0) toRange = ranges.length;
        ranges.push(ls, le);
        size += le - ls;
      }
    }
    ls = next;
  }
  // Via (where to send) and CSeq (what a client matches, RFC 3261 §17.1.3) are needed; From, To
  // and Call-ID are copied when present, so a request missing them still gets its 400 (RFC 4475
  // §3.3.1).
  if ((seen & 0b100010) !== 0b100010) return null;
  const { statusLine, tail } = parts;
  const tag = toTag !== undefined && toRange >= 0 &&
      !hasTag(bytes, ranges[toRange]!, ranges[toRange + 1]!)
    ? ";tag=" + toTag
    : "";
  const max = size + ranges.length + statusLine.length + tail.length + 3 * tag.length;
  const [out, at] = reserve(max);
  out.set(statusLine, at);
  let o = at + statusLine.length;
  for (let i = 0; i < ranges.length; i += 2) {
    const s = ranges[i]!;
    const e = ranges[i + 1]!;
    for (let k = s; k < e; k++) out[o++] = bytes[k]!; // (subarray + set costs more for a line)
    if (i === toRange && tag !== "") o += putString(out, o, tag);
    out[o++] = 13;
    out[o++] = 10;
  }
  out.set(tail, o);
  o += tail.length;
  return commit(out, at, o - at);
}

/** Encoded status lines and header tails of quick responses, by their text (few distinct ones). */
const encoder = new TextEncoder();
const fixedCache = new Map<string, QuickParts>();
const FIXED_CACHE_MAX = 256;

/** The status line and the extra headers + `Content-Length: 0` + blank line, as bytes (cached). */
export function quickParts(
  status: number,
  reason: string,
  extra?: ReadonlyArray<readonly [string, string]>,
): QuickParts {
  let key = status + " " + reason;
  if (extra !== undefined) { for (const [name, value] of extra) key += "\n" + name + ":" + value; }
  let parts = fixedCache.get(key);
  if (parts === undefined) {
    let tail = "";
    if (extra !== undefined) {
      for (const [name, value] of extra) tail += canonicalHeaderName(name) + ": " + value + "\r\n";
    }
    tail += "Content-Length: 0\r\n\r\n";
    parts = {
      statusLine: encoder.encode("SIP/2.0 " + status + " " + reason + "\r\n"),
      tail: encoder.encode(tail),
    };
    if (fixedCache.size >= FIXED_CACHE_MAX) fixedCache.clear();
    fixedCache.set(key, parts);
  }
  return parts;
}

/** Index of the first byte after the next LF at or after `i` (or the length). */
function nextLine(b: Uint8Array, i: number): number {
  // A loop, not `indexOf`: TypedArray#indexOf is a call into the runtime, dear for a 40-byte line.
  const n = b.length;
  while (i < n) if (b[i++] === 10) return i;
  return n;
}
