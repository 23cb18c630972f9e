/**
 * Digest authentication of REGISTER requests (RFC 3261 §22.4, RFC 2617 qop=auth, RFC 8760
 * SHA-256), for the registrar stage to call before it touches bindings.
 *
 * Nonces are stateless: `base64url(issued-at ms (8 bytes) | random (12) | HMAC-SHA256(secret,
 * issued-at | random | realm) truncated to 16)`. The only per-nonce state is the highest nonce count
 * seen, kept after a successful check to refuse replays. Subscriber lookups are cached briefly.
 *
 * @module
 */

import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { Buffer } from "node:buffer";
import type { SipRequest } from "../sip/message.ts";
import type { Subscriber, SubscriberStore } from "../storage/subscriber_store.ts";
import {
  type DigestAlgorithm,
  digestAlgorithm,
  type DigestCredentials,
  digestEqual,
  digestHexLength,
  digestResponse,
  formatDigestChallenge,
  parseDigestCredentials,
} from "../sip/digest.ts";

/** Settings of {@linkcode DigestAuthenticator}. */
export interface DigestAuthenticatorOptions {
  /** Where credentials (HA1 values) come from. */
  readonly subscribers: SubscriberStore;
  /** The key nonces are signed with; at least 16 bytes. Share it between processes of one realm. */
  readonly secret: Uint8Array;
  /** How long a nonce may be used, in seconds. @default {300} */
  readonly nonceTtlSeconds?: number;
  /** How long a subscriber lookup is cached, in seconds. @default {30} */
  readonly cacheTtlSeconds?: number;
  /**
   * How long an unknown-subscriber result is cached, in seconds. Equal to `cacheTtlSeconds` by
   * default so that cache timing does not tell known from unknown users; call
   * {@linkcode DigestAuthenticator.forget} after provisioning a subscriber.
   * @default {cacheTtlSeconds}
   */
  readonly negativeCacheTtlSeconds?: number;
  /** Most subscriber lookups cached; the oldest is dropped first. @default {100_000} */
  readonly cacheMaxEntries?: number;
  /** Most nonces whose count is tracked; the oldest is dropped first. @default {1_000_000} */
  readonly nonceCountMaxEntries?: number;
  /** The Retry-After, in seconds, suggested when the subscriber store is unreachable. @default {5} */
  readonly retryAfterSeconds?: number;
  /**
   * Whether the `uri` directive must equal the Request-URI (RFC 2617 §3.2.2.5 "should"; RFC 3261
   * does not ask it). Off by default: clients differ (SIPp sends its target `sip:host:port`) and
   * proxies rewrite the Request-URI, while the nonce count already stops replays. @default {false}
   */
  readonly requireUriMatch?: boolean;
  /**
   * The algorithms challenged with, most preferred first, and the only ones accepted (RFC 8760
   * §2.4). Clients that read only the first challenge (SIPp 3.6) need MD5 first.
   * @default {["SHA-256", "MD5"]}
   */
  readonly algorithms?: readonly DigestAlgorithm[];
  /** The clock, in milliseconds since the epoch. @default {Date.now} */
  readonly now?: () => number;
}

/** A header to add to the response: `[name, value]`. */
export type ResponseHeader = [name: string, value: string];

/** The outcome of {@linkcode DigestAuthenticator.check}. */
export type AuthResult =
  /** Authenticated as `username` in `realm`. */
  | { readonly ok: true; readonly username: string; readonly realm: string }
  /** Send 401 with these `WWW-Authenticate` headers (by default SHA-256 first, then MD5). */
  | { readonly ok: false; readonly status: 401; readonly headers: ResponseHeader[] }
  /** Send 400 (malformed credentials) or 403 (authenticated, but not for this AOR). */
  | { readonly ok: false; readonly status: 400 | 403; readonly reason: string }
  /** The subscriber store is unreachable: send 503 with `Retry-After: retryAfter`. */
  | { readonly ok: false; readonly status: 503; readonly retryAfter: number };

interface CacheEntry {
  readonly subscriber: Subscriber | null;
  readonly expiresAt: number;
}

interface NonceCount {
  nc: number;
  readonly issuedAt: number;
  readonly expiresAt: number;
}

const NONCE_TIME = 8;
const NONCE_RANDOM = 12;
const NONCE_TAG = 16;
const NONCE_HEAD = NONCE_TIME + NONCE_RANDOM;
const NONCE_BYTES = NONCE_HEAD + NONCE_TAG;
const NONCE_TEXT = /^[A-Za-z0-9_-]{48}$/; // base64url of NONCE_BYTES, unpadded

function positive(name: string, value: number | undefined, fallback: number): number {
  const v = value ?? fallback;
  if (!Number.isFinite(v) || v <= 0) {
    throw new RangeError(`Cannot create DigestAuthenticator: invalid ${name} ${v}`);
  }
  return v;
}

function sameUri(a: string, b: string): boolean {
  return a === b || a.toLowerCase() === b.toLowerCase();
}

/**
 * Checks `Authorization` credentials on requests and builds challenges. Owns a subscriber cache and
 * a bounded nonce-count table; everything else is derived from the secret.
 *
 * Unknown users and wrong passwords get the same 401: the digest is computed against a dummy HA1
 * for an unknown user, so the work done is the same.
 */
export class DigestAuthenticator {
  readonly #store: SubscriberStore;
  readonly #secret: Uint8Array;
  readonly #nonceTtlMs: number;
  readonly #cacheTtlMs: number;
  readonly #negativeTtlMs: number;
  readonly #cacheMax: number;
  readonly #nonceCountMax: number;
  readonly #retryAfter: number;
  readonly #requireUriMatch: boolean;
  readonly #algorithms: readonly DigestAlgorithm[];
  readonly #now: () => number;
  readonly #dummyHa1: Record<DigestAlgorithm, string>;
  readonly #cache = new Map<string, CacheEntry>();
  readonly #inflight = new Map<string, Promise<Subscriber | null>>();
  readonly #counts = new Map<string, NonceCount>();
  /** Nonces issued at or before this time and absent from #counts may have been evicted. */
  #evictedUpTo = -Infinity;

  /** Validates the options; throws RangeError on a bad one. */
  constructor(options: DigestAuthenticatorOptions) {
    if (options.secret.length < 16) {
      throw new RangeError("Cannot create DigestAuthenticator: secret must be at least 16 bytes");
    }
    this.#store = options.subscribers;
    this.#secret = Uint8Array.from(options.secret);
    this.#nonceTtlMs = positive("nonceTtlSeconds", options.nonceTtlSeconds, 300) * 1000;
    const cacheTtl = positive("cacheTtlSeconds", options.cacheTtlSeconds, 30);
    this.#cacheTtlMs = cacheTtl * 1000;
    this.#negativeTtlMs =
      positive("negativeCacheTtlSeconds", options.negativeCacheTtlSeconds, cacheTtl) * 1000;
    this.#cacheMax = positive("cacheMaxEntries", options.cacheMaxEntries, 100_000);
    this.#nonceCountMax = positive("nonceCountMaxEntries", options.nonceCountMaxEntries, 1_000_000);
    this.#retryAfter = positive("retryAfterSeconds", options.retryAfterSeconds, 5);
    this.#requireUriMatch = options.requireUriMatch ?? false;
    const algorithms = options.algorithms ?? ["SHA-256", "MD5"];
    if (
      algorithms.length === 0 || new Set(algorithms).size !== algorithms.length ||
      algorithms.some((a) => digestAlgorithm(a) !== a)
    ) {
      throw new RangeError(
        `Cannot create DigestAuthenticator: invalid algorithms ${JSON.stringify(algorithms)}`,
      );
    }
    this.#algorithms = [...algorithms];
    this.#now = options.now ?? Date.now;
    const dummy = createHmac("sha256", this.#secret).update("citysip dummy HA1").digest("hex");
    this.#dummyHa1 = { "MD5": dummy.slice(0, 32), "SHA-256": dummy };
  }

  /**
   * Authenticates `req` in `realm` (the domain of the To AOR or Request-URI). When `toUser` is
   * given, the authenticated username must equal it (RFC 3261 §10.3 step 3), else 403.
   *
   * Only `Authorization` headers whose realm is `realm` are considered; without one, or with a
   * bad, stale or replayed nonce, the answer is a 401 challenge (`stale=true` when the digest was
   * right but the nonce expired or its count did not increase). Never rejects.
   */
  async check(req: SipRequest, realm: string, toUser?: string): Promise<AuthResult> {
    let credentials: DigestCredentials | undefined;
    for (const header of req.headers) {
      if (header.name !== "authorization") continue;
      const parsed = parseDigestCredentials(header.value);
      if (!parsed.ok) {
        if (parsed.reason === "Not Digest credentials") continue;
        return {
          ok: false,
          status: 400,
          reason: `Malformed Authorization header: ${parsed.reason}`,
        };
      }
      if (parsed.value.realm === realm) {
        credentials = parsed.value;
        break;
      }
    }
    if (credentials === undefined) return this.#challenge(realm, false);

    // We offer only qop=auth: RFC 2069 answers (no qop) carry no nonce count, so a replay within
    // the nonce lifetime could not be told from a retry; auth-int was not offered.
    const algorithm = digestAlgorithm(credentials.algorithm);
    const { nc, cnonce } = credentials;
    if (
      algorithm === undefined || !this.#algorithms.includes(algorithm) ||
      credentials.qop !== "auth" || nc === undefined ||
      cnonce === undefined
    ) {
      return this.#challenge(realm, false);
    }
    if (credentials.response.length !== digestHexLength(algorithm)) {
      return { ok: false, status: 400, reason: "Malformed Authorization header: response length" };
    }
    if (this.#requireUriMatch && !sameUri(credentials.uri, req.uri)) {
      return { ok: false, status: 400, reason: "Authorization uri does not match Request-URI" };
    }
    const issuedAt = this.#verifyNonce(credentials.nonce, realm);
    if (issuedAt === undefined) return this.#challenge(realm, false);

    let subscriber: Subscriber | null;
    try {
      subscriber = await this.#lookup(credentials.username, realm);
    } catch {
      return { ok: false, status: 503, retryAfter: this.#retryAfter };
    }
    const stored = subscriber === null
      ? ""
      : algorithm === "MD5"
      ? subscriber.ha1Md5
      : subscriber.ha1Sha256;
    const known = stored.length === digestHexLength(algorithm);
    const expected = digestResponse({
      algorithm,
      ha1: known ? stored : this.#dummyHa1[algorithm],
      method: req.method,
      uri: credentials.uri,
      nonce: credentials.nonce,
      qop: "auth",
      nc,
      cnonce,
    });
    const match = digestEqual(expected, credentials.response);
    if (!(match && known)) return this.#challenge(realm, false);

    const now = this.#now();
    if (now - issuedAt > this.#nonceTtlMs || issuedAt > now + 5_000) {
      return this.#challenge(realm, true);
    }
    if (!this.#advanceCount(credentials.nonce, parseInt(nc, 16), issuedAt, now)) {
      return this.#challenge(realm, true);
    }
    if (toUser !== undefined && toUser !== credentials.username) {
      return { ok: false, status: 403, reason: "Authenticated user does not match To" };
    }
    return { ok: true, username: credentials.username, realm };
  }

  /** Drops the cached lookup of one subscriber, e.g. after it was added, changed or removed. */
  forget(username: string, realm: string): void {
    this.#cache.delete(cacheKey(username, realm));
  }

  #challenge(realm: string, stale: boolean): AuthResult {
    const nonce = this.#makeNonce(realm, this.#now());
    return {
      ok: false,
      status: 401,
      headers: this.#algorithms.map((algorithm) => [
        "WWW-Authenticate",
        formatDigestChallenge({ realm, nonce, algorithm, stale }),
      ]),
    };
  }

  #tag(head: Uint8Array, realm: string): Buffer {
    return createHmac("sha256", this.#secret).update(head).update(realm, "utf8").digest()
      .subarray(0, NONCE_TAG);
  }

  #makeNonce(realm: string, now: number): string {
    const bytes = Buffer.alloc(NONCE_BYTES);
    bytes.writeBigUInt64BE(BigInt(Math.max(0, Math.floor(now))), 0);
    randomBytes(NONCE_RANDOM).copy(bytes, NONCE_TIME);
    this.#tag(bytes.subarray(0, NONCE_HEAD), realm).copy(bytes, NONCE_HEAD);
    return bytes.toString("base64url");
  }

  /** The issue time of a nonce we signed for `realm`, or undefined. Does not check its age. */
  #verifyNonce(nonce: string, realm: string): number | undefined {
    if (!NONCE_TEXT.test(nonce)) return undefined;
    const bytes = Buffer.from(nonce, "base64url");
    if (bytes.length !== NONCE_BYTES) return undefined;
    const tag = this.#tag(bytes.subarray(0, NONCE_HEAD), realm);
    if (!timingSafeEqual(tag, bytes.subarray(NONCE_HEAD))) return undefined;
    return Number(bytes.readBigUInt64BE(0));
  }

  /**
   * Records nonce count `nc` for `nonce` if it is higher than any seen; false for a replay. A nonce
   * absent from the table but issued no later than an evicted one is refused, since its count may
   * have been dropped.
   */
  #advanceCount(nonce: string, nc: number, issuedAt: number, now: number): boolean {
    const entry = this.#counts.get(nonce);
    if (entry !== undefined) {
      if (nc <= entry.nc) return false;
      entry.nc = nc;
      return true;
    }
    if (nc < 1 || issuedAt <= this.#evictedUpTo) return false;
    this.#counts.set(nonce, { nc, issuedAt, expiresAt: issuedAt + this.#nonceTtlMs });
    // Entries are in first-use order, roughly issue order: drop expired ones from the front, then
    // the oldest while over the cap.
    for (const [key, value] of this.#counts) {
      if (value.expiresAt < now) {
        this.#counts.delete(key);
      } else if (this.#counts.size > this.#nonceCountMax) {
        this.#counts.delete(key);
        if (value.issuedAt > this.#evictedUpTo) this.#evictedUpTo = value.issuedAt;
      } else {
        break;
      }
    }
    return true;
  }

  #lookup(username: string, realm: string): Promise<Subscriber | null> {
    const key = cacheKey(username, realm);
    const now = this.#now();
    const hit = this.#cache.get(key);
    if (hit !== undefined) {
      if (hit.expiresAt > now) return Promise.resolve(hit.subscriber);
      this.#cache.delete(key);
    }
    const pending = this.#inflight.get(key);
    if (pending !== undefined) return pending;
    const lookup = this.#store.get(username, realm).then((subscriber) => {
      const ttl = subscriber === null ? this.#negativeTtlMs : this.#cacheTtlMs;
      this.#cache.delete(key);
      this.#cache.set(key, { subscriber, expiresAt: this.#now() + ttl });
      for (const oldest of this.#cache.keys()) {
        if (this.#cache.size <= this.#cacheMax) break;
        this.#cache.delete(oldest);
      }
      return subscriber;
    }).finally(() => this.#inflight.delete(key));
    this.#inflight.set(key, lookup);
    return lookup;
  }
}

function cacheKey(username: string, realm: string): string {
  return `${realm.length}:${realm}:${username}`;
}
