/**
 * Per-source rate limiters for hostile input and floods (issue 6): a token bucket per source IP, in a
 * table of bounded size that evicts the stalest source when full. One class serves both uses: the
 * REGISTER rate per source (a pike-like limiter; the caller answers 503 or drops) and the rate of new
 * TCP connections per source (the caller refuses the connection).
 *
 * Cost: `allow()` is one `Map` lookup and a few float operations on typed arrays; no allocation
 * except when a new source takes a slot (its key is stored). Memory is fixed at creation:
 * about 40 bytes per slot plus the map entry of each tracked source.
 *
 * The table keeps sources in a doubly linked list by last use, the stalest at the head:
 *
 * ```
 *  head (stalest)                                   tail (most recent)
 *    [slot 7] <-> [slot 2] <-> [slot 9] <-> ... <-> [slot 4]
 *   evicted first                         moved here on every allow()
 * ```
 *
 * Evicting a source forgets its bucket: if it comes back it starts with a full burst. Size
 * `maxSources` so a flood's own sources do not push out the ones being limited.
 *
 * @module
 */

/** Options of {@linkcode SourceRateLimiter}. */
export interface SourceRateLimitOptions {
  /** Sustained events per second allowed per source. */
  readonly ratePerSecond: number;
  /** Events a source may send at once after being quiet (bucket size, at least 1). */
  readonly burst: number;
  /** Sources tracked at once; when full, the stalest is forgotten. */
  readonly maxSources: number;
}

/** REGISTER requests per source IP. A phone registers every few minutes; an office NAT with a few
 * hundred phones behind one address stays well under this. */
export const REGISTER_RATE_DEFAULTS: SourceRateLimitOptions = Object.freeze({
  /** @default 50 */
  ratePerSecond: 50,
  /** @default 200 */
  burst: 200,
  /** @default 65536 */
  maxSources: 65536,
});

/** New TCP connections per source IP. */
export const CONNECTION_RATE_DEFAULTS: SourceRateLimitOptions = Object.freeze({
  /** @default 20 */
  ratePerSecond: 20,
  /** @default 100 */
  burst: 100,
  /** @default 65536 */
  maxSources: 65536,
});

const NONE = -1;

/**
 * A token bucket per source key (an IP address as text), in a bounded table. `allow(ip, nowMs)`
 * takes one token from `ip`'s bucket and says whether there was one. Buckets refill at
 * `ratePerSecond` up to `burst`. A new source starts with a full bucket. `nowMs` must come from one
 * clock (e.g. `performance.now()` or `Date.now()`); a clock that steps back refills nothing.
 */
export class SourceRateLimiter {
  readonly #ratePerMs: number;
  readonly #burst: number;
  readonly #max: number;
  readonly #slots = new Map<string, number>();
  readonly #keys: (string | undefined)[];
  readonly #tokens: Float64Array;
  readonly #last: Float64Array;
  readonly #prev: Int32Array;
  readonly #next: Int32Array;
  #head = NONE;
  #tail = NONE;
  #used = 0;
  #allowed = 0;
  #refused = 0;
  #evicted = 0;

  /** Creates a limiter; throws a `RangeError` naming the bad option. */
  constructor(options: SourceRateLimitOptions) {
    const { ratePerSecond, burst, maxSources } = options;
    if (!(ratePerSecond >= 0) || !Number.isFinite(ratePerSecond)) {
      throw new RangeError(`Cannot create limiter: invalid ratePerSecond ${ratePerSecond}`);
    }
    if (!(burst >= 1) || !Number.isFinite(burst)) {
      throw new RangeError(`Cannot create limiter: invalid burst ${burst} (at least 1)`);
    }
    if (!Number.isInteger(maxSources) || maxSources < 1 || maxSources > 0x3fffffff) {
      throw new RangeError(`Cannot create limiter: invalid maxSources ${maxSources}`);
    }
    this.#ratePerMs = ratePerSecond / 1000;
    this.#burst = burst;
    this.#max = maxSources;
    this.#keys = [];
    this.#tokens = new Float64Array(maxSources);
    this.#last = new Float64Array(maxSources);
    this.#prev = new Int32Array(maxSources).fill(NONE);
    this.#next = new Int32Array(maxSources).fill(NONE);
  }

  /** Takes one token from `ip`'s bucket at time `nowMs`; false when it has none (refuse). */
  allow(ip: string, nowMs: number): boolean {
    let slot = this.#slots.get(ip);
    if (slot === undefined) {
      slot = this.#take(ip);
      this.#tokens[slot] = this.#burst - 1;
      this.#last[slot] = nowMs;
      this.#allowed++;
      return true;
    }
    this.#touch(slot);
    const last = this.#last[slot]!;
    let tokens = this.#tokens[slot]!;
    if (nowMs > last) {
      tokens += (nowMs - last) * this.#ratePerMs;
      if (tokens > this.#burst) tokens = this.#burst;
      this.#last[slot] = nowMs;
    }
    if (tokens >= 1) {
      this.#tokens[slot] = tokens - 1;
      this.#allowed++;
      return true;
    }
    this.#tokens[slot] = tokens;
    this.#refused++;
    return false;
  }

  /** Sources tracked now. */
  get size(): number {
    return this.#slots.size;
  }

  /** Calls that returned true. */
  get allowed(): number {
    return this.#allowed;
  }

  /** Calls that returned false. */
  get refused(): number {
    return this.#refused;
  }

  /** Sources forgotten to make room for new ones. */
  get evicted(): number {
    return this.#evicted;
  }

  /** A slot for a new source: a free one, else the stalest source's. Links it at the tail. */
  #take(ip: string): number {
    let slot: number;
    if (this.#used < this.#max) {
      slot = this.#used++;
    } else {
      slot = this.#head;
      this.#unlink(slot);
      this.#slots.delete(this.#keys[slot]!);
      this.#evicted++;
    }
    this.#keys[slot] = ip;
    this.#slots.set(ip, slot);
    this.#link(slot);
    return slot;
  }

  /** Moves `slot` to the tail (most recently used). */
  #touch(slot: number): void {
    if (slot === this.#tail) return;
    this.#unlink(slot);
    this.#link(slot);
  }

  #unlink(slot: number): void {
    const p = this.#prev[slot]!;
    const n = this.#next[slot]!;
    if (p === NONE) this.#head = n;
    else this.#next[p] = n;
    if (n === NONE) this.#tail = p;
    else this.#prev[n] = p;
    this.#prev[slot] = NONE;
    this.#next[slot] = NONE;
  }

  #link(slot: number): void {
    this.#prev[slot] = this.#tail;
    this.#next[slot] = NONE;
    if (this.#tail === NONE) this.#head = slot;
    else this.#next[this.#tail] = slot;
    this.#tail = slot;
  }
}

/** A REGISTER-rate limiter per source IP; `options` override {@linkcode REGISTER_RATE_DEFAULTS}. */
export function registerRateLimiter(
  options?: Partial<SourceRateLimitOptions>,
): SourceRateLimiter {
  return new SourceRateLimiter({ ...REGISTER_RATE_DEFAULTS, ...options });
}

/** A new-connection-rate limiter per source IP; `options` override
 * {@linkcode CONNECTION_RATE_DEFAULTS}. */
export function connectionRateLimiter(
  options?: Partial<SourceRateLimitOptions>,
): SourceRateLimiter {
  return new SourceRateLimiter({ ...CONNECTION_RATE_DEFAULTS, ...options });
}
