/**
 * Typed header decoders, used on demand over the raw header fields of a parsed message
 * (RFC 3261 §19, §20, §25). Every decoder returns a value or a {@linkcode ParseError}; none throws.
 *
 * @module
 */

import type { ParseError, ParseResult, SipMessage } from "./message.ts";

/** Transport token of a Via, upper-cased (RFC 3261 §20.42, RFC 7118). */
// deno-lint-ignore ban-types
export type ViaTransport = "UDP" | "TCP" | "TLS" | "SCTP" | "WS" | "WSS" | (string & {});

/** One Via header value (RFC 3261 §20.42). */
export interface Via {
  /** Always `SIP/2.0`: any other protocol is a parse error. */
  readonly protocol: "SIP/2.0";
  readonly transport: ViaTransport;
  /** sent-by host as written; an IPv6 reference keeps its brackets (`[2001:db8::1]`, RFC 5118). */
  readonly host: string;
  readonly port: number | null;
  /** via-params by lower-case name; a flag such as `rport` maps to null. Values are as written. */
  readonly params: Map<string, string | null>;
  /** The branch parameter, or null when absent. */
  readonly branch: string | null;
}

/** A name-addr or addr-spec with its header parameters (RFC 3261 §20.10, §25.1). */
export interface NameAddr {
  /** The display name, unquoted and unescaped; null when there is none. */
  readonly displayName: string | null;
  /** The URI text (without the angle brackets). */
  readonly uri: string;
  /** Header parameters by lower-case name (`tag`, `expires`, `q`, `+sip.instance`, ...). Values are
   * as written: a quoted value keeps its quotes. A flag parameter maps to null. */
  readonly params: Map<string, string | null>;
}

/** A decoded SIP, SIPS or tel URI (RFC 3261 §19.1, RFC 3966). */
export interface SipUri {
  /** Lower-case scheme: `sip`, `sips` or `tel`. */
  readonly scheme: string;
  /** The user part, percent-escapes decoded; for `tel`, the telephone number. Null when absent. */
  readonly user: string | null;
  /** The password, percent-escapes decoded; null when absent. */
  readonly password: string | null;
  /** The host as written (IPv6 references keep their brackets); empty for `tel`. */
  readonly host: string;
  readonly port: number | null;
  /** uri-parameters by lower-case name, values as written; a flag (`lr`) maps to null. */
  readonly params: Map<string, string | null>;
  /** URI headers (after `?`) by name as written, values as written. */
  readonly headers: Map<string, string>;
}

/** The Contact header fields of a message: the `*` form (RFC 3261 §10.2.2) or a list. */
export type Contacts =
  | { readonly star: true }
  | { readonly star: false; readonly contacts: NameAddr[] };

/** A decoded CSeq (RFC 3261 §20.16). */
export interface CSeq {
  readonly seq: number;
  readonly method: string;
}

function fail(reason: string, header?: string, status: 400 | 416 = 400): ParseError {
  return header === undefined
    ? { ok: false, reason, status }
    : { ok: false, reason, header, status };
}

/** token characters (RFC 3261 §25.1). */
const TOKEN = new Uint8Array(128);
for (let c = 0x30; c <= 0x39; c++) TOKEN[c] = 1;
for (let c = 0x41; c <= 0x5a; c++) TOKEN[c] = 1;
for (let c = 0x61; c <= 0x7a; c++) TOKEN[c] = 1;
for (const ch of "-.!%*_+`'~") TOKEN[ch.charCodeAt(0)] = 1;

/** `s` lower-cased, without allocating when it already is. */
function lower(s: string): string {
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0x41 && c <= 0x5a) return s.toLowerCase();
  }
  return s;
}

function skipWs(s: string, i: number): number {
  while (i < s.length) {
    const c = s.charCodeAt(i);
    if (c !== 0x20 && c !== 0x09 && c !== 0x0d && c !== 0x0a) break;
    i++;
  }
  return i;
}

function tokenEnd(s: string, i: number): number {
  while (i < s.length) {
    const c = s.charCodeAt(i);
    if (c >= 128 || TOKEN[c] !== 1) break;
    i++;
  }
  return i;
}

/** Index just past the closing quote of a quoted-string opening at `i`, or -1. */
function quotedEnd(s: string, i: number): number {
  for (let j = i + 1; j < s.length; j++) {
    const c = s.charCodeAt(j);
    if (c === 0x5c) j++;
    else if (c === 0x22) return j + 1;
  }
  return -1;
}

function unquote(q: string): string {
  const inner = q.slice(1, -1);
  return inner.indexOf("\\") < 0 ? inner : inner.replace(/\\(.)/gs, "$1");
}

/** Header names whose values are comma-separated lists (RFC 3261 §7.3.1) that
 * {@linkcode headerAll} splits. */
export const LIST_HEADERS: ReadonlySet<string> = new Set([
  "via",
  "contact",
  "route",
  "record-route",
  "path",
  "service-route",
  "allow",
  "supported",
  "require",
  "proxy-require",
  "unsupported",
  "accept",
  "accept-encoding",
  "accept-language",
  "content-encoding",
  "content-language",
  "allow-events",
  "in-reply-to",
  "alert-info",
  "call-info",
  "error-info",
  "warning",
  "accept-contact",
  "reject-contact",
  "request-disposition",
  "p-associated-uri",
  "security-client",
  "security-server",
  "security-verify",
]);

/** The first value of header `name` (lower-case long form), or undefined. */
export function header(msg: SipMessage, name: string): string | undefined {
  const hs = msg.headers;
  for (let i = 0; i < hs.length; i++) {
    const h = hs[i]!;
    if (h.name === name) return h.value;
  }
  return undefined;
}

/**
 * Splits a comma-separated header value at top-level commas, respecting quoted strings and
 * `<...>`; items are trimmed, empty items dropped.
 */
export function splitList(value: string): string[] {
  const out: string[] = [];
  let from = 0;
  let angle = false;
  for (let i = 0; i < value.length; i++) {
    const c = value.charCodeAt(i);
    if (c === 0x22) {
      const e = quotedEnd(value, i);
      if (e < 0) break;
      i = e - 1;
    } else if (c === 0x3c) angle = true;
    else if (c === 0x3e) angle = false;
    else if (c === 0x2c && !angle) {
      const item = value.slice(from, i).trim();
      if (item.length > 0) out.push(item);
      from = i + 1;
    }
  }
  const last = value.slice(from).trim();
  if (last.length > 0) out.push(last);
  return out;
}

/**
 * All values of header `name` (lower-case long form), in order. For a list header (see
 * {@linkcode LIST_HEADERS}: Via, Contact, Route, Record-Route, Path, Allow, Supported, Require, ...)
 * each line is split at top-level commas. Any other header is returned one value per line,
 * unsplit: WWW-Authenticate, Authorization, Proxy-Authenticate, Proxy-Authorization, Date, From,
 * To and the like contain commas that are not list separators.
 */
export function headerAll(msg: SipMessage, name: string): string[] {
  const split = LIST_HEADERS.has(name);
  const out: string[] = [];
  for (const h of msg.headers) {
    if (h.name !== name) continue;
    if (!split || h.value.indexOf(",") < 0) {
      if (h.value.length > 0 || !split) out.push(h.value);
    } else {
      for (const item of splitList(h.value)) out.push(item);
    }
  }
  return out;
}

/** Parses `;name[=value]` parameters from `i` to the end into `params`; returns the index reached
 * (the length) or -1 when malformed. */
function parseParams(s: string, i: number, params: Map<string, string | null>): number {
  for (;;) {
    i = skipWs(s, i);
    if (i >= s.length) return i;
    const c = s.charCodeAt(i);
    if (c !== 0x3b) return -1;
    i = skipWs(s, i + 1);
    const ne = tokenEnd(s, i);
    if (ne === i) return -1;
    const name = lower(s.slice(i, ne));
    i = skipWs(s, ne);
    if (i < s.length && s.charCodeAt(i) === 0x3d) {
      i = skipWs(s, i + 1);
      if (s.charCodeAt(i) === 0x22) {
        const qe = quotedEnd(s, i);
        if (qe < 0) return -1;
        params.set(name, s.slice(i, qe));
        i = qe;
      } else {
        let j = i;
        while (j < s.length) {
          const d = s.charCodeAt(j);
          if (d === 0x3b || d === 0x2c || d === 0x20 || d === 0x09) break;
          j++;
        }
        if (j === i) return -1;
        params.set(name, s.slice(i, j));
        i = j;
      }
    } else {
      params.set(name, null);
    }
  }
}

function isHostChar(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) ||
    c === 0x2e || c === 0x2d || c === 0x5f;
}

/** Whether s[from, to) is an IPv6 address (RFC 3261 §25.1 IPv6address, RFC 4291 §2.2): eight
 * groups of 1-4 hex digits, or fewer with one `::`, the last two optionally an IPv4 address. */
function isIpv6(s: string, from: number, to: number): boolean {
  let groups = 0;
  let gap = false;
  let i = from;
  if (s.charCodeAt(i) === 0x3a) {
    if (s.charCodeAt(i + 1) !== 0x3a) return false;
    gap = true;
    i += 2;
    if (i === to) return true;
  }
  for (;;) {
    const g0 = i;
    while (i < to && i - g0 < 5 && isHex(s.charCodeAt(i))) i++;
    if (i < to && s.charCodeAt(i) === 0x2e) {
      // An IPv4 tail: counts as two groups.
      return groups <= (gap ? 5 : 6) && (gap || groups === 6) && isIpv4(s, g0, to);
    }
    if (i === g0 || i - g0 > 4) return false;
    groups++;
    if (i === to) break;
    if (s.charCodeAt(i) !== 0x3a) return false;
    i++;
    if (s.charCodeAt(i) === 0x3a) {
      if (gap) return false;
      gap = true;
      i++;
      if (i === to) break;
    } else if (i === to) return false;
  }
  return gap ? groups <= 7 : groups === 8;
}

function isHex(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x46) || (c >= 0x61 && c <= 0x66);
}

function isIpv4(s: string, from: number, to: number): boolean {
  let parts = 0;
  let i = from;
  while (parts < 4) {
    const d0 = i;
    let v = 0;
    while (i < to && i - d0 < 3) {
      const d = s.charCodeAt(i) - 0x30;
      if (d < 0 || d > 9) break;
      v = v * 10 + d;
      i++;
    }
    if (i === d0 || v > 255) return false;
    parts++;
    if (parts === 4) break;
    if (s.charCodeAt(i) !== 0x2e) return false;
    i++;
  }
  return parts === 4 && i === to;
}

/** Scans host [":" port] at `i`. Returns [host, port, next index] or null. */
function scanHostPort(
  s: string,
  i: number,
  allowWs: boolean,
): [string, number | null, number] | null {
  let host: string;
  if (s.charCodeAt(i) === 0x5b) {
    const rb = s.indexOf("]", i);
    if (rb < 0) return null;
    host = s.slice(i, rb + 1);
    if (!isIpv6(s, i + 1, rb)) return null;
    i = rb + 1;
  } else {
    const h0 = i;
    while (i < s.length && isHostChar(s.charCodeAt(i))) i++;
    if (i === h0) return null;
    host = s.slice(h0, i);
  }
  let port: number | null = null;
  let j = allowWs ? skipWs(s, i) : i;
  if (j < s.length && s.charCodeAt(j) === 0x3a) {
    j = allowWs ? skipWs(s, j + 1) : j + 1;
    let p = 0;
    const d0 = j;
    while (j < s.length) {
      const d = s.charCodeAt(j) - 0x30;
      if (d < 0 || d > 9) break;
      p = p * 10 + d;
      j++;
    }
    if (j === d0 || j - d0 > 5 || p > 65535) return null;
    port = p;
    i = j;
  }
  return [host, port, i];
}

const BAD_VIA: ParseError = Object.freeze(fail("Malformed Via header", "Via"));
const BAD_URI: ParseError = Object.freeze(fail("Malformed URI"));
const KNOWN_TRANSPORTS: ReadonlySet<string> = new Set(["UDP", "TCP", "TLS", "SCTP", "WS", "WSS"]);

/**
 * Parses one Via value (RFC 3261 §20.42; split a multi-value line with {@linkcode headerAll}
 * first). Allows LWS around `/` and parameters (RFC 4475 §3.1.1.1); IPv6 references keep their
 * brackets (RFC 5118); `rport` may have no value (RFC 3581).
 */
export function parseVia(value: string): ParseResult<Via> {
  const bad = BAD_VIA;
  const s = value;
  let i = skipWs(s, 0);
  let e = tokenEnd(s, i);
  const proto = s.slice(i, e);
  i = skipWs(s, e);
  if (s.charCodeAt(i) !== 0x2f) return bad;
  i = skipWs(s, i + 1);
  e = tokenEnd(s, i);
  const version = s.slice(i, e);
  i = skipWs(s, e);
  if (s.charCodeAt(i) !== 0x2f) return bad;
  i = skipWs(s, i + 1);
  e = tokenEnd(s, i);
  if (e === i) return bad;
  const rawTransport = s.slice(i, e);
  const transport = KNOWN_TRANSPORTS.has(rawTransport) ? rawTransport : rawTransport.toUpperCase();
  if ((proto !== "SIP" && proto.toUpperCase() !== "SIP") || version !== "2.0") return bad;
  i = skipWs(s, e);
  if (i === e) return bad;
  const hp = scanHostPort(s, i, true);
  if (hp === null) return bad;
  const params = new Map<string, string | null>();
  const end = parseParams(s, hp[2], params);
  if (end < 0 || end < s.length) return bad;
  return {
    ok: true,
    value: {
      protocol: "SIP/2.0",
      transport,
      host: hp[0],
      port: hp[1],
      params,
      branch: params.get("branch") ?? null,
    },
  };
}

/**
 * Parses a name-addr (`"Bob" <sip:bob@x>;tag=1`) or an addr-spec (`sip:bob@x;tag=1`) with its
 * header parameters (RFC 3261 §20.10, §25.1). In the addr-spec form everything after the first `;`
 * is header parameters, not URI parameters. `header` names the header in an error.
 */
export function parseNameAddr(value: string, header = "Contact"): ParseResult<NameAddr> {
  const s = value;
  let i = skipWs(s, 0);
  let displayName: string | null = null;
  let uri: string;
  if (s.charCodeAt(i) === 0x22) {
    const qe = quotedEnd(s, i);
    if (qe < 0) return fail(`Malformed ${header} header`, header);
    displayName = unquote(s.slice(i, qe));
    i = skipWs(s, qe);
    if (s.charCodeAt(i) !== 0x3c) return fail(`Malformed ${header} header`, header);
  }
  const lt = s.indexOf("<", i);
  let prefixOk = lt >= 0;
  for (let k = i; prefixOk && k < lt; k++) {
    const c = s.charCodeAt(k);
    if (c === 0x3a || c === 0x3b || c === 0x22 || c === 0x3e) prefixOk = false;
  }
  if (prefixOk) {
    if (lt > i) {
      const dn = s.slice(i, lt).trim();
      if (dn.length > 0) {
        // An unquoted display name is tokens and LWS (RFC 3261 §25.1, RFC 4475 §3.1.2.15).
        for (let k = 0; k < dn.length; k++) {
          const c = dn.charCodeAt(k);
          if (c !== 0x20 && c !== 0x09 && (c >= 128 || TOKEN[c] !== 1)) {
            return fail(`Malformed ${header} header`, header);
          }
        }
        displayName = dn;
      }
    }
    const gt = s.indexOf(">", lt);
    if (gt < 0) return fail(`Malformed ${header} header`, header);
    uri = s.slice(lt + 1, gt).trim();
    i = gt + 1;
  } else {
    let j = i;
    while (j < s.length) {
      const c = s.charCodeAt(j);
      if (c === 0x3b || c === 0x20 || c === 0x09) break;
      j++;
    }
    uri = s.slice(i, j);
    i = j;
    // An addr-spec with URI headers or a comma must be in <> (RFC 3261 §20.10, RFC 4475 §3.1.2.13).
    if (uri.indexOf("?") >= 0 || uri.indexOf(",") >= 0) {
      return fail(`Malformed ${header} header`, header);
    }
  }
  const colon = uri.indexOf(":");
  if (colon <= 0) return fail(`Malformed ${header} header`, header);
  const params = new Map<string, string | null>();
  const end = parseParams(s, i, params);
  if (end < 0 || end < s.length) return fail(`Malformed ${header} header`, header);
  return { ok: true, value: { displayName, uri, params } };
}

/**
 * Decodes all Contact header values of `msg` (RFC 3261 §10.2, §20.10). A lone `*` (§10.2.2) gives
 * `{star: true}`; `*` together with any other Contact value is a 400 error. No Contact gives an
 * empty list.
 */
export function parseContacts(msg: SipMessage): ParseResult<Contacts> {
  const values = headerAll(msg, "contact");
  const contacts: NameAddr[] = [];
  let star = false;
  for (const v of values) {
    if (v === "*") {
      star = true;
      continue;
    }
    const r = parseNameAddr(v, "Contact");
    if (!r.ok) return r;
    contacts.push(r.value);
  }
  if (star) {
    if (values.length !== 1) return fail("Invalid Contact: * mixed with other values", "Contact");
    return { ok: true, value: { star: true } };
  }
  return { ok: true, value: { star: false, contacts } };
}

function unescape(s: string): string | null {
  if (s.indexOf("%") < 0) return s;
  try {
    return decodeURIComponent(s);
  } catch {
    return null;
  }
}

function isScheme(s: string): boolean {
  if (s.length === 0) return false;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i) | 0x20;
    const alpha = c >= 0x61 && c <= 0x7a;
    if (
      i === 0
        ? !alpha
        : !(alpha || (s.charCodeAt(i) >= 0x30 && s.charCodeAt(i) <= 0x39) || "+-.".includes(s[i]!))
    ) {
      return false;
    }
  }
  return true;
}

/** Parses uri-parameters from `i` up to `?` or the end; returns the index reached or -1. */
function parseUriParams(s: string, i: number, params: Map<string, string | null>): number {
  while (i < s.length && s.charCodeAt(i) === 0x3b) {
    let j = i + 1;
    while (j < s.length) {
      const c = s.charCodeAt(j);
      if (c === 0x3b || c === 0x3f) break;
      j++;
    }
    const p = s.slice(i + 1, j);
    const eq = p.indexOf("=");
    const name = lower(eq < 0 ? p : p.slice(0, eq));
    if (name.length === 0) return -1;
    params.set(name, eq < 0 ? null : p.slice(eq + 1));
    i = j;
  }
  return i;
}

/**
 * Parses a SIP, SIPS (RFC 3261 §19.1.1) or tel (RFC 3966) URI. Percent-escapes in the user and
 * password are decoded (RFC 3261 §19.1.4 compares them unescaped). Another scheme gives an error
 * with status 416 (Unsupported URI Scheme); a malformed URI gives 400.
 */
export function parseUri(text: string): ParseResult<SipUri> {
  const s = text;
  const bad = BAD_URI;
  const colon = s.indexOf(":");
  if (colon <= 0) return bad;
  const rawScheme = s.slice(0, colon);
  if (!isScheme(rawScheme)) return bad;
  const scheme = rawScheme.toLowerCase();
  const params = new Map<string, string | null>();
  const headers = new Map<string, string>();
  if (scheme === "tel") {
    let j = colon + 1;
    while (j < s.length && s.charCodeAt(j) !== 0x3b) j++;
    const number = s.slice(colon + 1, j);
    if (number.length === 0) return bad;
    const end = parseUriParams(s, j, params);
    if (end !== s.length) return bad;
    return {
      ok: true,
      value: { scheme, user: number, password: null, host: "", port: null, params, headers },
    };
  }
  if (scheme !== "sip" && scheme !== "sips") return fail("Unsupported URI Scheme", undefined, 416);
  let i = colon + 1;
  let user: string | null = null;
  let password: string | null = null;
  const at = s.indexOf("@", i);
  if (at >= 0) {
    const info = s.slice(i, at);
    const pc = info.indexOf(":");
    const rawUser = pc < 0 ? info : info.slice(0, pc);
    if (rawUser.length === 0) return bad;
    for (let k = 0; k < rawUser.length; k++) {
      const c = rawUser.charCodeAt(k);
      if (c <= 0x20 || c >= 0x7f || c === 0x3c || c === 0x3e || c === 0x22) return bad;
    }
    user = unescape(rawUser);
    if (user === null) return bad;
    if (pc >= 0) {
      password = unescape(info.slice(pc + 1));
      if (password === null) return bad;
    }
    i = at + 1;
  }
  const hp = scanHostPort(s, i, false);
  if (hp === null) return bad;
  i = parseUriParams(s, hp[2], params);
  if (i < 0) return bad;
  if (i < s.length) {
    if (s.charCodeAt(i) !== 0x3f) return bad;
    for (const pair of s.slice(i + 1).split("&")) {
      if (pair.length === 0) continue;
      const eq = pair.indexOf("=");
      if (eq <= 0) return bad;
      headers.set(pair.slice(0, eq), pair.slice(eq + 1));
    }
  }
  return { ok: true, value: { scheme, user, password, host: hp[0], port: hp[1], params, headers } };
}

const KEY_PARAMS = ["maddr", "method", "transport", "ttl", "user"] as const;

function escapeKeyPart(s: string): string {
  return /[%@:;?]/.test(s) ? s.replace(/[%@:;?]/g, (c) => "%" + c.charCodeAt(0).toString(16)) : s;
}

/**
 * A canonical key for URI equality (RFC 3261 §19.1.4): scheme and host compared case-insensitively,
 * user and password case-sensitively after unescaping, an absent port differs from an explicit
 * one, and only the `maddr`, `method`, `transport`, `ttl` and `user` parameters take part (names and
 * values lower-cased, sorted); URI headers take part as well. This approximates the RFC, which also
 * compares any other parameter present in both URIs.
 */
export function uriKey(uri: SipUri): string {
  let key = uri.scheme + ":";
  if (uri.user !== null) {
    key += escapeKeyPart(uri.user);
    if (uri.password !== null) key += ":" + escapeKeyPart(uri.password);
    if (uri.scheme !== "tel") key += "@";
  }
  key += uri.host.toLowerCase();
  if (uri.port !== null) key += ":" + uri.port;
  for (const name of KEY_PARAMS) {
    if (!uri.params.has(name)) continue;
    const v = uri.params.get(name);
    key += v === null || v === undefined ? ";" + name : ";" + name + "=" + v.toLowerCase();
  }
  if (uri.headers.size > 0) {
    const hs = [...uri.headers].map(([k, v]) => k.toLowerCase() + "=" + v).sort();
    key += "?" + hs.join("&");
  }
  return key;
}

/**
 * The canonical address-of-record of a To URI (RFC 3261 §10.3 step 5): `sip:user@host` (or `sips:`),
 * user unescaped, host lower-cased, without port, parameters or headers. A tel URI gives
 * `tel:<number>`.
 */
export function aorOf(uri: SipUri): string {
  if (uri.scheme === "tel") return "tel:" + (uri.user ?? "");
  return uri.scheme + ":" + (uri.user !== null ? uri.user + "@" : "") + uri.host.toLowerCase();
}

/** Parses a CSeq value (RFC 3261 §20.16): sequence number 0..2^31-1 (§8.1.1.5), LWS, method. */
export function parseCSeq(value: string): ParseResult<CSeq> {
  const s = value;
  let i = skipWs(s, 0);
  const d0 = i;
  let seq = 0;
  while (i < s.length) {
    const d = s.charCodeAt(i) - 0x30;
    if (d < 0 || d > 9) break;
    seq = seq * 10 + d;
    i++;
  }
  if (i === d0 || i - d0 > 10 || seq > 0x7fffffff) return fail("Malformed CSeq header", "CSeq");
  const m0 = skipWs(s, i);
  if (m0 === i) return fail("Malformed CSeq header", "CSeq");
  const me = tokenEnd(s, m0);
  if (me === m0 || skipWs(s, me) !== s.length) return fail("Malformed CSeq header", "CSeq");
  return { ok: true, value: { seq, method: s.slice(m0, me) } };
}

/**
 * The `tag` parameter of a From or To value, or null when absent or unreadable. A fast scan that
 * does not build the full {@linkcode NameAddr}.
 */
export function tagOf(nameAddrValue: string): string | null {
  const s = nameAddrValue;
  let i = skipWs(s, 0);
  if (s.charCodeAt(i) === 0x22) {
    i = quotedEnd(s, i);
    if (i < 0) return null;
  }
  const lt = s.indexOf("<", i);
  if (lt >= 0) {
    i = s.indexOf(">", lt);
    if (i < 0) return null;
  }
  for (;;) {
    i = s.indexOf(";", i);
    if (i < 0) return null;
    i = skipWs(s, i + 1);
    const ne = tokenEnd(s, i);
    if (ne - i === 3) {
      const c0 = s.charCodeAt(i) | 0x20,
        c1 = s.charCodeAt(i + 1) | 0x20,
        c2 = s.charCodeAt(i + 2) | 0x20;
      if (c0 === 0x74 && c1 === 0x61 && c2 === 0x67) {
        let j = skipWs(s, ne);
        if (s.charCodeAt(j) !== 0x3d) return null;
        j = skipWs(s, j + 1);
        const te = tokenEnd(s, j);
        return te > j ? s.slice(j, te) : null;
      }
    }
    i = ne;
  }
}

/** Parses an Expires value or `expires` parameter: a non-negative integer (RFC 3261 §20.19), capped
 * at 2^32-1; null when malformed. */
export function parseExpires(value: string): number | null {
  const s = value.trim();
  if (s.length === 0) return null;
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const d = s.charCodeAt(i) - 0x30;
    if (d < 0 || d > 9) return null;
    n = n * 10 + d;
  }
  return n > 0xffffffff ? 0xffffffff : n;
}
