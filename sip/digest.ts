/**
 * HTTP Digest as SIP uses it (RFC 3261 §22.4, RFC 2617 §3, RFC 8760): parse `Digest` credentials,
 * format a `WWW-Authenticate` challenge, compute HA1 and the request digest, compare digests in
 * constant time. Pure functions, no state, no I/O.
 *
 * @module
 */

import { createHash, timingSafeEqual } from "node:crypto";

/** The digest algorithms we compute (RFC 8760 §2.1). The `-sess` variants are not supported. */
export type DigestAlgorithm = "MD5" | "SHA-256";

/** Credentials from an `Authorization` or `Proxy-Authorization` header (RFC 3261 §25.1). */
export interface DigestCredentials {
  /** The username, with quoted-pair escapes removed. */
  readonly username: string;
  readonly realm: string;
  readonly nonce: string;
  /** The `uri` directive (digest-uri), as sent. */
  readonly uri: string;
  /** The request digest, lower-cased hex. */
  readonly response: string;
  /** The `algorithm` directive as sent; absent means MD5 (RFC 2617 §3.2.1). */
  readonly algorithm?: string;
  readonly cnonce?: string;
  /** The nonce count as sent: 8 hex digits (RFC 2617 §3.2.2). */
  readonly nc?: string;
  /** The `qop` directive as sent (unquoted). */
  readonly qop?: string;
  readonly opaque?: string;
  /** Every directive, names lower-cased, values unquoted and unescaped (including unknown ones). */
  readonly params: ReadonlyMap<string, string>;
}

/** The result of {@linkcode parseDigestCredentials}. */
export type CredentialsResult =
  | { readonly ok: true; readonly value: DigestCredentials }
  | { readonly ok: false; readonly reason: string };

const TOKEN_CHAR = /[A-Za-z0-9\-.!%*_+`'~]/;
const LWS = /[ \t\r\n]/;

/**
 * Reads `name=value` directives separated by commas. Values are tokens or quoted strings; linear
 * white space is allowed around `=` and `,`, and empty list elements are skipped.
 */
function parseDirectives(text: string): Map<string, string> | string {
  const params = new Map<string, string>();
  const n = text.length;
  let i = 0;
  const skipLws = () => {
    while (i < n && LWS.test(text[i]!)) i++;
  };
  for (;;) {
    skipLws();
    while (i < n && text[i] === ",") {
      i++;
      skipLws();
    }
    if (i >= n) break;
    const nameStart = i;
    while (i < n && TOKEN_CHAR.test(text[i]!)) i++;
    const name = text.slice(nameStart, i).toLowerCase();
    if (name.length === 0) return "Malformed directive name";
    skipLws();
    if (text[i] !== "=") return `Missing value for ${name}`;
    i++;
    skipLws();
    let value: string;
    if (text[i] === '"') {
      i++;
      let out = "";
      let closed = false;
      while (i < n) {
        const c = text[i]!;
        if (c === '"') {
          closed = true;
          i++;
          break;
        }
        if (c === "\\") {
          const next = text[i + 1];
          if (next === undefined || next === "\r" || next === "\n") return `Bad escape in ${name}`;
          out += next;
          i += 2;
          continue;
        }
        out += c;
        i++;
      }
      if (!closed) return `Unterminated quoted string in ${name}`;
      value = out;
    } else {
      const valueStart = i;
      while (i < n && TOKEN_CHAR.test(text[i]!)) i++;
      value = text.slice(valueStart, i);
      if (value.length === 0) return `Empty value for ${name}`;
    }
    if (params.has(name)) return `Duplicate ${name}`;
    params.set(name, value);
    skipLws();
    if (i >= n) break;
    if (text[i] !== ",") return `Expected comma after ${name}`;
  }
  return params;
}

const HEX = /^[0-9a-fA-F]+$/;

/**
 * Parses a `Digest` credentials value (the value of `Authorization` or `Proxy-Authorization`,
 * RFC 3261 §25.1 `credentials`). The scheme and directive names are case-insensitive. Requires
 * `username`, `realm`, `nonce`, `uri` and a hex `response`; when `qop` is present, also `cnonce`
 * and an 8-hex-digit `nc` (RFC 2617 §3.2.2).
 *
 * @example
 * ```ts
 * const r = parseDigestCredentials('Digest username="alice",realm="example.com",...');
 * if (r.ok) console.log(r.value.username);
 * ```
 */
export function parseDigestCredentials(value: string): CredentialsResult {
  const text = value.trim();
  const m = /^([A-Za-z]+)(?:[ \t\r\n]+|$)/.exec(text);
  if (m === null || m[1]!.toLowerCase() !== "digest") {
    return { ok: false, reason: "Not Digest credentials" };
  }
  const params = parseDirectives(text.slice(m[0].length));
  if (typeof params === "string") return { ok: false, reason: params };
  for (const required of ["username", "realm", "nonce", "uri", "response"]) {
    if (!params.has(required)) return { ok: false, reason: `Missing ${required}` };
  }
  const response = params.get("response")!;
  if (!HEX.test(response)) return { ok: false, reason: "Malformed response" };
  const qop = params.get("qop");
  const nc = params.get("nc");
  const cnonce = params.get("cnonce");
  if (qop !== undefined) {
    if (cnonce === undefined || cnonce.length === 0) return { ok: false, reason: "Missing cnonce" };
    if (nc === undefined) return { ok: false, reason: "Missing nc" };
  }
  if (nc !== undefined && !/^[0-9a-fA-F]{8}$/.test(nc)) {
    return { ok: false, reason: "Malformed nc" };
  }
  const optional: {
    algorithm?: string;
    cnonce?: string;
    nc?: string;
    qop?: string;
    opaque?: string;
  } = {};
  for (const key of ["algorithm", "cnonce", "nc", "qop", "opaque"] as const) {
    const v = params.get(key);
    if (v !== undefined) optional[key] = v;
  }
  return {
    ok: true,
    value: {
      username: params.get("username")!,
      realm: params.get("realm")!,
      nonce: params.get("nonce")!,
      uri: params.get("uri")!,
      response: response.toLowerCase(),
      ...optional,
      params,
    },
  };
}

/**
 * Maps an `algorithm` directive to a supported algorithm: absent means MD5 (RFC 2617 §3.2.1);
 * names are case-insensitive. Returns undefined for anything else (`MD5-sess`, `SHA-512-256`, ...).
 */
export function digestAlgorithm(name: string | undefined): DigestAlgorithm | undefined {
  if (name === undefined) return "MD5";
  const upper = name.toUpperCase();
  if (upper === "MD5") return "MD5";
  if (upper === "SHA-256") return "SHA-256";
  return undefined;
}

/** Options of {@linkcode formatDigestChallenge}. */
export interface DigestChallenge {
  readonly realm: string;
  readonly nonce: string;
  readonly algorithm: DigestAlgorithm;
  /** Whether to offer `qop="auth"` (RFC 2617 §3.2.1). @default {true} */
  readonly qop?: boolean;
  /** Adds `stale=true`: the credentials were right, only the nonce was not (RFC 2617 §3.2.1). */
  readonly stale?: boolean;
  readonly opaque?: string;
}

function quote(s: string): string {
  return `"${s.replace(/[\\"]/g, "\\$&")}"`;
}

/**
 * Formats a `WWW-Authenticate` (or `Proxy-Authenticate`) challenge value (RFC 3261 §25.1
 * `challenge`), e.g. `Digest realm="example.com", nonce="...", algorithm=SHA-256, qop="auth"`.
 */
export function formatDigestChallenge(challenge: DigestChallenge): string {
  let s = `Digest realm=${quote(challenge.realm)}, nonce=${quote(challenge.nonce)}`;
  if (challenge.opaque !== undefined) s += `, opaque=${quote(challenge.opaque)}`;
  s += `, algorithm=${challenge.algorithm}`;
  if (challenge.qop !== false) s += `, qop="auth"`;
  if (challenge.stale === true) s += ", stale=true";
  return s;
}

const HASH_NAME: Record<DigestAlgorithm, string> = { "MD5": "md5", "SHA-256": "sha256" };

/** The length in hex digits of a digest computed with `algorithm`. */
export function digestHexLength(algorithm: DigestAlgorithm): number {
  return algorithm === "MD5" ? 32 : 64;
}

/** H(data) as lower-case hex, the data encoded as UTF-8 (RFC 7616 §3.4.1 for SHA-256). */
export function digestHash(algorithm: DigestAlgorithm, data: string): string {
  return createHash(HASH_NAME[algorithm]).update(data, "utf8").digest("hex");
}

/** HA1 = H(username ":" realm ":" password) as lower-case hex (RFC 2617 §3.2.2.2). */
export function ha1(
  username: string,
  realm: string,
  password: string,
  algorithm: DigestAlgorithm,
): string {
  return digestHash(algorithm, `${username}:${realm}:${password}`);
}

/**
 * What the request digest is computed over. With `qop: "auth"`, `nc` and `cnonce` take part
 * (RFC 2617 §3.2.2.1); without qop, the RFC 2069 form is computed.
 */
export type DigestResponseInput =
  & {
    readonly algorithm: DigestAlgorithm;
    /** HA1 as hex (see {@linkcode ha1}). */
    readonly ha1: string;
    readonly method: string;
    /** The digest-uri (the `uri` directive). */
    readonly uri: string;
    readonly nonce: string;
  }
  & (
    | { readonly qop: "auth"; readonly nc: string; readonly cnonce: string }
    | { readonly qop?: undefined }
  );

/**
 * The request digest as lower-case hex: KD(HA1, nonce ":" nc ":" cnonce ":" qop ":" HA2) with
 * qop=auth, or KD(HA1, nonce ":" HA2) without qop (RFC 2069), where HA2 = H(method ":" uri) and
 * KD(s, d) = H(s ":" d) (RFC 2617 §3.2.2.1).
 */
export function digestResponse(input: DigestResponseInput): string {
  const ha2 = digestHash(input.algorithm, `${input.method}:${input.uri}`);
  const middle = input.qop === "auth"
    ? `${input.nonce}:${input.nc}:${input.cnonce}:auth`
    : input.nonce;
  return digestHash(input.algorithm, `${input.ha1}:${middle}:${ha2}`);
}

const scratchA = new Uint8Array(64);
const scratchB = new Uint8Array(64);

function lowerHexInto(s: string, into: Uint8Array): void {
  // OR 0x20 lower-cases A-F and leaves digits and a-f as they are.
  for (let i = 0; i < s.length; i++) into[i] = s.charCodeAt(i) | 0x20;
}

/**
 * Compares two hex digests in constant time for equal lengths (`timingSafeEqual`), ignoring the case
 * of hex letters; meant for hex only. The length is not secret: different lengths return false at
 * once. Digests up to 64 digits are compared without allocating.
 */
export function digestEqual(a: string, b: string): boolean {
  if (a.length !== b.length) return false;
  const n = a.length;
  const x = n <= 64 ? scratchA.subarray(0, n) : new Uint8Array(n);
  const y = n <= 64 ? scratchB.subarray(0, n) : new Uint8Array(n);
  lowerHexInto(a, x);
  lowerHexInto(b, y);
  return timingSafeEqual(x, y);
}
