/**
 * Parses one complete SIP message (RFC 3261 §7) from bytes: the start line, the header fields
 * (unfolded, names lower-cased and compact forms expanded), and the body by Content-Length.
 * Typed header values are decoded on demand by `sip/headers.ts`.
 *
 * @module
 */

import { parseCSeq } from "./headers.ts";
import type { HeaderField, ParseError, ParseResult, SipMessage } from "./message.ts";

const utf8 = new TextDecoder();
/** Messages up to this size are decoded whole (body included) to search the text. */
const FAST_DECODE_MAX = 4096;

/**
 * Most header lines a message may have (issue 6 item 3), folded continuation lines included: each
 * line costs a field object and a string, so without a bound a 64 KiB datagram of one-byte headers
 * makes thousands. A message with more gets status 400 "Too Many Headers". Real requests carry 10-30.
 */
export const MAX_HEADERS = 256;

/** Compact header forms (RFC 3261 §7.3.3, §20; RFC 3265, 3515, 3892, 4028, 4474, 3841). */
export const COMPACT_FORMS: Readonly<Record<string, string>> = Object.freeze({
  i: "call-id",
  m: "contact",
  v: "via",
  f: "from",
  t: "to",
  l: "content-length",
  k: "supported",
  e: "content-encoding",
  c: "content-type",
  s: "subject",
  o: "event",
  u: "allow-events",
  r: "refer-to",
  b: "referred-by",
  x: "session-expires",
  y: "identity",
  a: "accept-contact",
  j: "reject-contact",
  d: "request-disposition",
});

/** token characters (RFC 3261 §25.1). */
const TOKEN = new Uint8Array(128);
for (let c = 0x30; c <= 0x39; c++) TOKEN[c] = 1;
for (let c = 0x41; c <= 0x5a; c++) TOKEN[c] = 1;
for (let c = 0x61; c <= 0x7a; c++) TOKEN[c] = 1;
for (const ch of "-.!%*_+`'~") TOKEN[ch.charCodeAt(0)] = 1;

/** Whether `s` is a non-empty RFC 3261 token. */
export function isToken(s: string): boolean {
  if (s.length === 0) return false;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 128 || TOKEN[c] !== 1) return false;
  }
  return true;
}

/** Raw header name as received -> canonical lower-case long name. Bounded so junk cannot grow it. */
const nameCache = new Map<string, string>();
const NAME_CACHE_MAX = 512;

function canonicalName(raw: string): string | undefined {
  const cached = nameCache.get(raw);
  if (cached !== undefined) return cached;
  if (!isToken(raw)) return undefined;
  const lower = raw.toLowerCase();
  const name = lower.length === 1 ? (COMPACT_FORMS[lower] ?? lower) : lower;
  if (nameCache.size < NAME_CACHE_MAX) nameCache.set(raw, name);
  return name;
}

function isWs(c: number): boolean {
  return c === 0x20 || c === 0x09;
}

function fail(reason: string, status: 400 | 505 = 400, header?: string): ParseError {
  return header === undefined
    ? { ok: false, reason, status }
    : { ok: false, reason, header, status };
}

/** Index of the CR that starts the first CRLFCRLF at or after `from`, or -1. Steps two bytes at a
 * time: any CRLFCRLF has its second or third byte on an even step. */
export function findHeaderEnd(bytes: Uint8Array, from: number): number {
  const n = bytes.length;
  for (let i = from + 1; i < n; i += 2) {
    const c = bytes[i];
    if (c === 10) {
      // i is the first or second LF
      if (bytes[i - 1] === 13) {
        if (bytes[i + 1] === 13 && bytes[i + 2] === 10) return i - 1;
        if (i - 3 >= from && bytes[i - 2] === 10 && bytes[i - 3] === 13) return i - 3;
      }
    } else if (c === 13) {
      // i is the first or second CR
      if (bytes[i + 1] === 10) {
        if (bytes[i + 2] === 13 && bytes[i + 3] === 10) return i;
        if (i - 2 >= from && bytes[i - 1] === 10 && bytes[i - 2] === 13) return i - 2;
      }
    }
  }
  return -1;
}

function checkVersion(version: string): ParseError | null {
  if (version.length === 7 && (version === "SIP/2.0" || version.toUpperCase() === "SIP/2.0")) {
    return null;
  }
  const slash = version.indexOf("/");
  const dot = version.indexOf(".");
  if (
    slash === 3 && version.slice(0, 3).toUpperCase() === "SIP" && dot > 4 &&
    dot < version.length - 1 && isDigits(version, 4, dot) &&
    isDigits(version, dot + 1, version.length)
  ) {
    return fail("Version Not Supported", 505);
  }
  return fail("Malformed SIP version");
}

function isDigits(s: string, from: number, to: number): boolean {
  if (to <= from) return false;
  for (let i = from; i < to; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x30 || c > 0x39) return false;
  }
  return true;
}

/** Content-Length value -> byte count, or -1 when malformed. */
function parseLength(value: string): number {
  if (value.length === 0 || value.length > 9) return -1;
  let n = 0;
  for (let i = 0; i < value.length; i++) {
    const d = value.charCodeAt(i) - 0x30;
    if (d < 0 || d > 9) return -1;
    n = n * 10 + d;
  }
  return n;
}

const MANDATORY: ReadonlyArray<readonly [string, string]> = [
  ["to", "To"],
  ["from", "From"],
  ["cseq", "CSeq"],
  ["call-id", "Call-ID"],
  ["via", "Via"],
];

/**
 * Parses one complete, already framed SIP message (for UDP a whole datagram).
 *
 * - Leading CRLFs are skipped (RFC 3261 §7.5); the version must be `SIP/2.0` in any case, another
 *   well-formed `SIP/x.y` gives status 505.
 * - Header names are matched case-insensitively and stored lower-case, compact forms expanded;
 *   folded lines are joined with one space (§7.3.1); whitespace around the colon is allowed.
 * - The body is Content-Length bytes (a longer datagram is cut, a shorter one is an error); with no
 *   Content-Length the body is the rest of the input (§18.3 allows that over UDP only; the stream
 *   framer enforces it over TCP). The body is a subarray of `bytes`, not a copy.
 * - A request must have To, From, CSeq, Call-ID and Via (§8.1.1), and the CSeq method must equal the
 *   request method; responses are not checked for these. A second To, From, CSeq or Call-ID line
 *   is an error in any message (§7.3: they are single-valued), as is a control character in the
 *   Request-URI.
 * - More than `maxHeaders` header lines (default {@linkcode MAX_HEADERS}; continuation lines count)
 *   is an error, status 400 "Too Many Headers"; the count is checked before each line is read.
 * - Header values are kept as text slices of the decoded header section: a caller that keeps one
 *   for long should copy it (V8 sliced strings keep their parent alive).
 *
 * Never throws; errors are values with the status a server should answer.
 */
export function parseMessage(
  bytes: Uint8Array,
  maxHeaders: number = MAX_HEADERS,
): ParseResult<SipMessage> {
  const n = bytes.length;
  let start = 0;
  while (start < n && (bytes[start] === 13 || bytes[start] === 10)) start++;
  if (start >= n) return fail("Empty message");
  // Small messages: decode everything once and search the text. When every byte became one char
  // (no multi-byte UTF-8), text indices are byte indices.
  let text = "";
  let hdrEnd = -1;
  let fast = false;
  if (n <= FAST_DECODE_MAX) {
    text = utf8.decode(bytes);
    if (text.length === n) {
      fast = true;
      hdrEnd = text.indexOf("\r\n\r\n", start);
    }
  }
  if (!fast) hdrEnd = findHeaderEnd(bytes, start);
  let bodyStart: number;
  if (hdrEnd < 0) {
    // No empty line: tolerate a datagram that ends right after its last header.
    hdrEnd = n;
    while (hdrEnd > start && (bytes[hdrEnd - 1] === 10 || bytes[hdrEnd - 1] === 13)) hdrEnd--;
    bodyStart = n;
  } else {
    bodyStart = hdrEnd + 4;
  }
  // pos .. len: the header section of `text` (start line included, final CRLFCRLF excluded).
  let pos = start;
  let len = hdrEnd;
  if (!fast) {
    text = utf8.decode(bytes.subarray(start, hdrEnd));
    pos = 0;
    len = text.length;
  }

  let lineEnd = text.indexOf("\r\n", pos);
  if (lineEnd < 0 || lineEnd > len) lineEnd = len;
  const firstLine = text.slice(pos, lineEnd);

  // Start line.
  let isRequest: boolean;
  let method = "";
  let uri = "";
  let version: string;
  let status = 0;
  let reason = "";
  if (
    firstLine.length > 4 && firstLine.charCodeAt(3) === 0x2f &&
    (firstLine.charCodeAt(0) | 0x20) === 0x73 &&
    (firstLine.charCodeAt(1) | 0x20) === 0x69 && (firstLine.charCodeAt(2) | 0x20) === 0x70
  ) {
    isRequest = false;
    const sp = firstLine.indexOf(" ");
    if (sp < 0) return fail("Malformed status line");
    version = firstLine.slice(0, sp);
    const verr = checkVersion(version);
    if (verr !== null) return verr;
    if (!isDigits(firstLine, sp + 1, sp + 4)) return fail("Malformed status line");
    const after = firstLine.charCodeAt(sp + 4);
    if (!Number.isNaN(after) && after !== 0x20) return fail("Malformed status line");
    status = parseLength(firstLine.slice(sp + 1, sp + 4));
    if (status < 100) return fail("Malformed status line");
    reason = firstLine.slice(sp + 5);
  } else {
    isRequest = true;
    const sp1 = firstLine.indexOf(" ");
    const sp2 = firstLine.lastIndexOf(" ");
    if (sp1 <= 0 || sp2 <= sp1 + 1) return fail("Malformed request line");
    method = firstLine.slice(0, sp1);
    if (!isToken(method)) return fail("Malformed request line");
    uri = firstLine.slice(sp1 + 1, sp2);
    // No whitespace or other control characters inside (RFC 3261 §25.1: a URI is printable ASCII).
    for (let i = 0; i < uri.length; i++) {
      const c = uri.charCodeAt(i);
      if (c <= 0x20 || c === 0x7f) return fail("Malformed Request-URI");
    }
    if (uri.indexOf(":") <= 0) return fail("Malformed Request-URI");
    version = firstLine.slice(sp2 + 1);
    const verr = checkVersion(version);
    if (verr !== null) return verr;
  }

  // Header fields.
  const headers: HeaderField[] = [];
  let seen = 0; // bit per mandatory header, in MANDATORY order
  let cseqValue: string | undefined;
  let lengthValue: string | undefined;
  let curName: string | undefined;
  let curValue = "";
  pos = lineEnd + 2;
  let lines = 0;
  while (pos < len) {
    if (++lines > maxHeaders) return fail("Too Many Headers");
    let e = text.indexOf("\r\n", pos);
    if (e < 0 || e > len) e = len;
    const c0 = text.charCodeAt(pos);
    if (c0 === 0x20 || c0 === 0x09) {
      if (curName === undefined) return fail("Malformed header folding");
      const more = text.slice(pos, e).trim();
      if (more.length > 0) curValue = curValue.length > 0 ? curValue + " " + more : more;
    } else {
      if (curName !== undefined) {
        headers.push({ name: curName, value: curValue });
        if (curName === "cseq" && cseqValue === undefined) cseqValue = curValue;
      }
      const colon = text.indexOf(":", pos);
      if (colon < 0 || colon > e) return fail("Malformed header line");
      let nameEnd = colon;
      while (nameEnd > pos) {
        const c = text.charCodeAt(nameEnd - 1);
        if (c !== 0x20 && c !== 0x09) break;
        nameEnd--;
      }
      const name = canonicalName(text.slice(pos, nameEnd));
      if (name === undefined) return fail("Malformed header name");
      curName = name;
      let vs = colon + 1;
      let ve = e;
      while (vs < ve && isWs(text.charCodeAt(vs))) vs++;
      while (ve > vs && isWs(text.charCodeAt(ve - 1))) ve--;
      curValue = text.slice(vs, ve);
      switch (name) {
        // To, From, CSeq and Call-ID are single-valued: a second line is an error (RFC 3261 §7.3,
        // RFC 4475 §3.3.8).
        case "to":
          if ((seen & 1) !== 0) return fail("Multiple To headers", 400, "To");
          seen |= 1;
          break;
        case "from":
          if ((seen & 2) !== 0) return fail("Multiple From headers", 400, "From");
          seen |= 2;
          break;
        case "cseq":
          if ((seen & 4) !== 0) return fail("Multiple CSeq headers", 400, "CSeq");
          seen |= 4;
          break;
        case "call-id":
          if ((seen & 8) !== 0) return fail("Multiple Call-ID headers", 400, "Call-ID");
          seen |= 8;
          break;
        case "via":
          seen |= 16;
          break;
        case "content-length":
          if (lengthValue === undefined) lengthValue = curValue;
          else if (lengthValue !== curValue) {
            return fail("Conflicting Content-Length headers", 400, "Content-Length");
          }
          break;
      }
    }
    pos = e + 2;
  }
  if (curName !== undefined) {
    headers.push({ name: curName, value: curValue });
    if (curName === "cseq" && cseqValue === undefined) cseqValue = curValue;
  }

  // Body.
  let body: Uint8Array;
  if (lengthValue !== undefined) {
    const cl = parseLength(lengthValue);
    if (cl < 0) return fail("Malformed Content-Length header", 400, "Content-Length");
    if (bodyStart + cl > n) {
      return fail("Content-Length exceeds message size", 400, "Content-Length");
    }
    body = bytes.subarray(bodyStart, bodyStart + cl);
  } else {
    body = bytes.subarray(bodyStart, n);
  }

  if (!isRequest) {
    return { ok: true, value: { kind: "response", version, status, reason, headers, body } };
  }
  if (seen !== 31) {
    for (let i = 0; i < MANDATORY.length; i++) {
      if ((seen & (1 << i)) === 0) {
        const display = MANDATORY[i]![1];
        return fail(`Missing ${display} header`, 400, display);
      }
    }
  }
  const cseq = parseCSeq(cseqValue ?? "");
  if (!cseq.ok) return cseq;
  if (cseq.value.method !== method) return fail("CSeq method does not match request", 400, "CSeq");
  return { ok: true, value: { kind: "request", version, method, uri, headers, body } };
}
