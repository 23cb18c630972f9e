/**
 * A pure stream framer for SIP over TCP (RFC 3261 §18.3): it cuts a byte stream into messages
 * (headers end at CRLFCRLF, the body is Content-Length bytes) and reports RFC 5626 §4.4.1 CRLFCRLF
 * keep-alive pings between messages.
 *
 * ```
 * idle --non-CRLF byte--> headers --CRLFCRLF--> body --Content-Length bytes--> idle
 *   \--CRLFCRLF--> ping        (a lone CRLF is ignored, RFC 3261 §7.5)
 * ```
 *
 * @module
 */

import { findHeaderEnd } from "./parse.ts";

/** Why a flow's byte stream cannot be framed. The flow must be closed after any of these. */
export type FrameErrorReason =
  | "message-too-large"
  | "bad-content-length"
  | "missing-content-length";

/** One item cut from the stream. */
export type FrameItem =
  | { readonly type: "message"; readonly bytes: Uint8Array }
  | { readonly type: "ping" }
  | { readonly type: "error"; readonly reason: FrameErrorReason };

/** Options of {@linkcode StreamFramer}. */
export interface StreamFramerOptions {
  /** Largest message accepted, headers and body together, in bytes. @default 65536 */
  readonly maxMessageSize?: number;
  /** Clock for {@linkcode StreamFramer.pendingSince}, in ms. @default Date.now */
  readonly now?: () => number;
}

const PING: FrameItem = Object.freeze({ type: "ping" });
const NONE: readonly FrameItem[] = Object.freeze([]);

/**
 * Frames one TCP flow. `push()` takes each chunk as read and returns the items it completes, in
 * order (when none, a shared frozen empty array: the result is read-only). Message bytes are
 * subarrays of the pushed chunk when the message lies wholly inside it (no copy: do not reuse a
 * chunk's memory after pushing it), else a buffer holding exactly that message.
 *
 * Cost: an idle framer is ~96 bytes of heap (measured with 300,000 framers after traffic) and holds
 * no buffer; a partial message holds one buffer of at most `maxMessageSize` bytes.
 *
 * After an `error` item the framer stops (later pushes return nothing) and the caller should close
 * the flow: the stream position is lost. A ping item should be answered with a single CRLF.
 * An idle framer holds no buffer; while a message is partial, {@linkcode pendingSince} tells when it
 * began so the caller can enforce a header/body completion timeout.
 */
export class StreamFramer {
  readonly #max: number;
  readonly #now: () => number;
  /** The partial message, or null when idle. */
  #buf: Uint8Array | null = null;
  /** Bytes held in #buf. */
  #len = 0;
  /** Size of the whole partial message once its headers are complete, else -1. */
  #total = -1;
  /** Progress through an idle "\r\n\r\n" (0..3). */
  #crlf = 0;
  #since = 0;
  #failed = false;

  /** Creates a framer for one flow. */
  constructor(options?: StreamFramerOptions) {
    this.#max = options?.maxMessageSize ?? 65536;
    this.#now = options?.now ?? Date.now;
  }

  /** When (per the clock option, ms) the current partial message began; 0 when idle. */
  get pendingSince(): number {
    return this.#buf === null ? 0 : this.#since;
  }

  /** Whether the framer has reported an error and stopped. */
  get failed(): boolean {
    return this.#failed;
  }

  /** Bytes held for a partial message (0 when idle). */
  get bufferedBytes(): number {
    return this.#len;
  }

  /** Feeds the next chunk of the stream; returns the items it completes. */
  push(chunk: Uint8Array): readonly FrameItem[] {
    if (this.#failed || chunk.length === 0) return NONE;
    const out: FrameItem[] = [];
    let p = 0;
    if (this.#buf !== null) {
      p = this.#continue(chunk, out);
      if (p < 0) return out;
    }
    this.#scan(chunk, p, out);
    return out;
  }

  #fail(out: FrameItem[], reason: FrameErrorReason): void {
    out.push({ type: "error", reason });
    this.#failed = true;
    this.#buf = null;
    this.#len = 0;
    this.#total = -1;
  }

  #reset(): void {
    this.#buf = null;
    this.#len = 0;
    this.#total = -1;
    this.#since = 0;
  }

  /** Idle processing of chunk[p..]. */
  #scan(chunk: Uint8Array, p: number, out: FrameItem[]): void {
    const n = chunk.length;
    const max = this.#max;
    while (p < n) {
      const c = chunk[p]!;
      if (c === 13 || c === 10) {
        if (c === ((this.#crlf & 1) === 0 ? 13 : 10)) {
          if (++this.#crlf === 4) {
            out.push(PING);
            this.#crlf = 0;
          }
        } else {
          this.#crlf = c === 13 ? 1 : 0;
        }
        p++;
        continue;
      }
      this.#crlf = 0;
      const he = findHeaderEnd(chunk, p);
      if (he < 0) {
        // max bytes without the CRLFCRLF: the whole message cannot fit (as in #continue).
        if (n - p >= max) return this.#fail(out, "message-too-large");
        const rest = n - p;
        const buf = new Uint8Array(Math.min(max, Math.max(512, rest * 2)));
        buf.set(chunk.subarray(p), 0);
        this.#buf = buf;
        this.#len = rest;
        this.#since = this.#now();
        return;
      }
      const hlen = he + 4 - p;
      if (hlen > max) return this.#fail(out, "message-too-large");
      const cl = contentLength(chunk, p, he);
      if (cl === MISSING) return this.#fail(out, "missing-content-length");
      if (cl === BAD) return this.#fail(out, "bad-content-length");
      const total = hlen + cl;
      if (total > max) return this.#fail(out, "message-too-large");
      if (p + total <= n) {
        out.push({ type: "message", bytes: chunk.subarray(p, p + total) });
        p += total;
        continue;
      }
      const buf = new Uint8Array(total);
      buf.set(chunk.subarray(p), 0);
      this.#buf = buf;
      this.#len = n - p;
      this.#total = total;
      this.#since = this.#now();
      return;
    }
  }

  /** Continues a partial message with `chunk`; returns where idle scanning resumes, or -1. */
  #continue(chunk: Uint8Array, out: FrameItem[]): number {
    const n = chunk.length;
    let buf = this.#buf!;
    const old = this.#len;
    if (this.#total < 0) {
      const take = Math.min(n, this.#max - old);
      if (old + take > buf.length) {
        const grown = new Uint8Array(Math.min(this.#max, Math.max(old + take, buf.length * 2)));
        grown.set(buf.subarray(0, old), 0);
        buf = grown;
        this.#buf = grown;
      }
      buf.set(take === n ? chunk : chunk.subarray(0, take), old);
      const len = old + take;
      this.#len = len;
      const he = findHeaderEnd(buf.subarray(0, len), Math.max(0, old - 3));
      if (he < 0) {
        if (len >= this.#max) this.#fail(out, "message-too-large");
        return -1;
      }
      const cl = contentLength(buf, 0, he);
      if (cl === MISSING) {
        this.#fail(out, "missing-content-length");
        return -1;
      }
      if (cl === BAD) {
        this.#fail(out, "bad-content-length");
        return -1;
      }
      const total = he + 4 + cl;
      if (total > this.#max) {
        this.#fail(out, "message-too-large");
        return -1;
      }
      if (len >= total) {
        out.push({ type: "message", bytes: buf.subarray(0, total) });
        this.#reset();
        return total - old;
      }
      // Headers complete, body partial: keep a buffer of exactly the message size.
      const exact = new Uint8Array(total);
      exact.set(buf.subarray(0, len), 0);
      this.#buf = exact;
      this.#total = total;
      return -1;
    }
    const need = this.#total - old;
    const take = Math.min(need, n);
    buf.set(take === n ? chunk : chunk.subarray(0, take), old);
    this.#len = old + take;
    if (take < need) return -1;
    out.push({ type: "message", bytes: buf });
    this.#reset();
    return take;
  }
}

const MISSING = -1;
const BAD = -2;

/**
 * The Content-Length (or compact `l`) of the header section [p, he) of `b`: the value, MISSING, or
 * BAD (malformed, or two different values). A huge value is returned as is (too large).
 */
function contentLength(b: Uint8Array, p: number, he: number): number {
  let result = MISSING;
  let ls = nextLine(b, p, he);
  while (ls < he + 2) {
    const c = b[ls]! | 0x20;
    let i = -1;
    if (c === 0x6c) i = ls + 1;
    else if (c === 0x63 && isContentLength(b, ls)) i = ls + 14;
    if (i > 0) {
      while (b[i] === 0x20 || b[i] === 0x09) i++;
      if (b[i] === 0x3a) {
        i++;
        while (b[i] === 0x20 || b[i] === 0x09) i++;
        let v = 0;
        const d0 = i;
        for (;;) {
          const d = b[i]! - 0x30;
          if (!(d >= 0 && d <= 9)) break;
          v = v * 10 + d;
          i++;
        }
        if (i === d0) return BAD;
        while (b[i] === 0x20 || b[i] === 0x09) i++;
        if (b[i] !== 13) return BAD;
        if (result !== MISSING && result !== v) return BAD;
        result = v;
      }
    }
    ls = nextLine(b, ls, he);
  }
  return result;
}

/** Index after the next LF at or after `i`, scanning no further than `limit`; else `limit + 2`. */
function nextLine(b: Uint8Array, i: number, limit: number): number {
  while (i < limit) {
    if (b[i++] === 10) return i;
  }
  return limit + 2;
}

const CONTENT_LENGTH = "content-length";

function isContentLength(b: Uint8Array, s: number): boolean {
  for (let k = 1; k < 14; k++) {
    if ((b[s + k]! | 0x20) !== CONTENT_LENGTH.charCodeAt(k)) return false;
  }
  return true;
}
