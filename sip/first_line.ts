/**
 * A cheap look at the first line of a SIP message (RFC 3261 §7.1, §7.2), for classification and
 * admission control before any full parse.
 *
 * @module
 */

/** What the first line of a message says. */
export type FirstLine =
  | { readonly kind: "request"; readonly method: string }
  | { readonly kind: "response"; readonly status: number }
  | { readonly kind: "invalid" };

const INVALID: FirstLine = Object.freeze({ kind: "invalid" });

/**
 * The methods of RFC 3261 and its common extensions, interned so a scan of them allocates nothing but
 * the result object.
 */
export const KNOWN_METHODS: readonly string[] = [
  "REGISTER",
  "INVITE",
  "ACK",
  "BYE",
  "CANCEL",
  "OPTIONS",
  "SUBSCRIBE",
  "NOTIFY",
  "PUBLISH",
  "MESSAGE",
  "INFO",
  "PRACK",
  "UPDATE",
  "REFER",
];

/** Interned request results, one per known method. */
const KNOWN_RESULTS: ReadonlyMap<string, FirstLine> = new Map(
  KNOWN_METHODS.map((m) => [m, Object.freeze({ kind: "request", method: m } as const)]),
);

/** token characters (RFC 3261 §25.1): alphanum and `-.!%*_+`~'`. */
const TOKEN = new Uint8Array(128);
for (let c = 0x30; c <= 0x39; c++) TOKEN[c] = 1;
for (let c = 0x41; c <= 0x5a; c++) TOKEN[c] = 1;
for (let c = 0x61; c <= 0x7a; c++) TOKEN[c] = 1;
for (const ch of "-.!%*_+`'~") TOKEN[ch.charCodeAt(0)] = 1;

function matchKnown(bytes: Uint8Array, start: number, end: number): FirstLine | undefined {
  const len = end - start;
  outer: for (const m of KNOWN_METHODS) {
    if (m.length !== len) continue;
    for (let i = 0; i < len; i++) {
      if (bytes[start + i] !== m.charCodeAt(i)) continue outer;
    }
    return KNOWN_RESULTS.get(m);
  }
  return undefined;
}

/**
 * Reads only the first line of `bytes` (after any leading CRLFs, RFC 3261 §7.5): a request's method
 * or a response's status code. Checks the shape (`token SP ... SP SIP/` for a request,
 * `SIP/x.y SP 3DIGIT` for a response) but not the Request-URI; a full parse finds the rest.
 * Known methods are interned: the returned object is shared and frozen.
 */
export function scanFirstLine(bytes: Uint8Array): FirstLine {
  const n = bytes.length;
  let p = 0;
  while (p < n && (bytes[p] === 13 || bytes[p] === 10)) p++;
  if (
    p + 4 < n && bytes[p] === 0x53 && bytes[p + 1] === 0x49 && bytes[p + 2] === 0x50 &&
    bytes[p + 3] === 0x2f
  ) {
    // "SIP/" version SP status-code
    // Byte loops, not `indexOf`: TypedArray#indexOf is a call into the runtime (hot under overload).
    let sp = p + 4;
    while (sp < n && sp <= p + 16 && bytes[sp] !== 0x20) sp++;
    if (sp >= n || sp > p + 16 || sp + 3 >= n) return INVALID;
    let status = 0;
    for (let i = sp + 1; i < sp + 4; i++) {
      const d = (bytes[i] ?? 0) - 0x30;
      if (d < 0 || d > 9) return INVALID;
      status = status * 10 + d;
    }
    const after = bytes[sp + 4];
    if (after !== undefined && after !== 0x20 && after !== 13) return INVALID;
    if (status < 100) return INVALID;
    return { kind: "response", status };
  }
  let q = p;
  while (q < n) {
    const c = bytes[q]!;
    if (c >= 128 || TOKEN[c] !== 1) break;
    q++;
  }
  if (q === p || q >= n || bytes[q] !== 0x20) return INVALID;
  // The line must go on to a second SP (before the version); a bare "METHOD uri" is not a request.
  let lineEnd = q;
  while (lineEnd < n && bytes[lineEnd] !== 13) lineEnd++;
  let sp2 = lineEnd - 1;
  while (sp2 > q + 1 && bytes[sp2] !== 0x20) sp2--;
  if (sp2 <= q + 1) return INVALID;
  const known = matchKnown(bytes, p, q);
  if (known !== undefined) return known;
  let method = "";
  for (let i = p; i < q; i++) method += String.fromCharCode(bytes[i]!);
  return { kind: "request", method };
}
