/**
 * The stage runtime (SEDA): a stage is a named step with a bounded queue, a worker set (how many items
 * it may have in service at once) and counters. Stages run inside one single-threaded event loop, so the
 * worker set matters for stages that await I/O (the registrar awaiting a group commit).
 *
 * Two ways to run:
 * - `inline`: an item offered to an idle stage is handled at once, on the caller's stack (cheap steps:
 *   frame, classify, respond). It queues only while the worker set is busy.
 * - `deferred`: items always queue and are drained from a macrotask, at most `budgetMs` of work per turn,
 *   so the event loop goes back to reading sockets between turns. Under overload the queue, not the
 *   kernel's socket buffers, holds the backlog, and its measured delay drives admission control.
 *
 * The queue is a ring buffer of fixed capacity; `head` is the oldest item, `size` how many are held:
 *
 * ```
 *   slots:  [ . . . h1 h2 h3 h4 . . ]   capacity 10
 *                   ^head       ^head+size (mod capacity): next free slot
 * ```
 *
 * No exception leaves a stage: a handler that throws (a bug) is counted as a drop with reason
 * `handler-error` and reported through `onError`.
 *
 * @module
 */
import { setImmediate } from "node:timers";

/** Upper bounds (seconds) of the latency histogram buckets: 10 µs to 5 s, then +Inf. */
export const LATENCY_BUCKETS: readonly number[] = [
  0.00001,
  0.000025,
  0.00005,
  0.0001,
  0.00025,
  0.0005,
  0.001,
  0.0025,
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
];

/** A histogram's data, as it crosses a process boundary (JSON) or is exported. */
export interface HistogramData {
  /** Per-bucket counts for {@link LATENCY_BUCKETS}, then +Inf. */
  readonly counts: ArrayLike<number>;
  readonly sum: number;
  readonly count: number;
}

/** A cumulative-on-export histogram of durations in seconds, with the fixed {@link LATENCY_BUCKETS}. */
export class Histogram {
  /** counts[i] holds observations <= LATENCY_BUCKETS[i] and > the bucket below; the last is +Inf. */
  readonly counts: Float64Array = new Float64Array(LATENCY_BUCKETS.length + 1);
  sum = 0;
  count = 0;

  /** Records one duration in seconds. */
  observe(seconds: number): void {
    let i = 0;
    while (i < LATENCY_BUCKETS.length && seconds > LATENCY_BUCKETS[i]!) i++;
    this.counts[i]!++;
    this.sum += seconds;
    this.count++;
  }

  /** The q-quantile (0..1) estimated from the buckets by linear interpolation; 0 when empty. */
  quantile(q: number): number {
    if (this.count === 0) return 0;
    const rank = q * this.count;
    let seen = 0;
    for (let i = 0; i < this.counts.length; i++) {
      const c = this.counts[i]!;
      if (seen + c >= rank && c > 0) {
        const lower = i === 0 ? 0 : LATENCY_BUCKETS[i - 1]!;
        const upper = LATENCY_BUCKETS[i] ?? lower * 2;
        return lower + (upper - lower) * ((rank - seen) / c);
      }
      seen += c;
    }
    return LATENCY_BUCKETS[LATENCY_BUCKETS.length - 1]!;
  }
}

/** A stage's counters at one moment, for metrics and the benchmark. */
export interface StageSnapshot {
  readonly name: string;
  readonly arrivals: number;
  readonly admitted: number;
  readonly completed: number;
  readonly dropped: Readonly<Record<string, number>>;
  readonly queueLength: number;
  readonly queueCapacity: number;
  /** The queue delay a new item can expect (the admission signal), ms. */
  readonly queueDelayMs: number;
  /** Measured wall time per item taken while backlogged, ms. */
  readonly perItemMs: number;
  /** Whether the queue is standing (overload, see {@link Stage.standing}). */
  readonly standing: boolean;
  readonly inFlight: number;
  readonly concurrency: number;
  readonly queueWait: HistogramData;
  readonly serviceTime: HistogramData;
}

/** How a stage is built. */
export interface StageOptions<T> {
  /** The stage's name in metrics: `frame`, `classify`, `registrar`, ... */
  readonly name: string;
  /** Maximum items waiting. */
  readonly capacity: number;
  /** Maximum items in service at once (the worker set). */
  readonly concurrency: number;
  /** `inline` or `deferred` (see the module docs). @default "inline" */
  readonly mode?: "inline" | "deferred";
  /** Deferred stages: milliseconds of handler work per event-loop turn. @default 4 */
  readonly budgetMs?: number;
  /**
   * Deferred stages: the queue wait (ms) a standing queue is judged by (see {@link Stage.standing}).
   * @default no target (never standing)
   */
  readonly targetMs?: number;
  /**
   * Deferred stages: while the queue is standing, a normal-lane item that has waited longer than
   * this (ms) is not served but handed to `onLate` and counted as dropped `late` (SEDA's shedding
   * at the queue, CoDel's drop at dequeue): in overload an answer that late is worth less than the
   * work it costs, and the tail of the queue would otherwise wait several targets when the drain
   * rate falls. Outside overload (a burst, a GC pause) late items are served. Urgent items are
   * always served. @default no deadline
   */
  readonly deadlineMs?: number;
  /** Answers an item taken late (see `deadlineMs`), e.g. with 503. */
  readonly onLate?: (item: T, waitedMs: number) => void;
  /** Handles one item. A returned promise keeps the item in service until it settles. */
  readonly handler: (item: T) => void | Promise<void>;
  /** Told of handler exceptions (bugs). The item is counted as dropped with reason `handler-error`. */
  readonly onError?: (error: unknown, stage: string) => void;
}

const now = (): number => performance.now();

/** Inline items timed for the service-time histogram: one in this many (a power of two). */
const SAMPLE_EVERY = 8;

/** A queue from which nothing was taken for this long is stuck: its head's age is its delay. */
const STUCK_MS = 100;
/**
 * CoDel's interval: a queue is standing (overloaded, not bursting) once every item taken has waited
 * longer than the target for this long.
 */
const STANDING_INTERVAL_MS = 100;
/**
 * Items waiting below which a queue's wait is the event loop's, not the queue's (CoDel: more than a
 * packet queued): a late item with fewer behind it does not make the queue standing, and admission
 * (stages/classify.ts) never refuses on delay below it.
 */
export const MIN_BACKLOG = 32;
/** A standing queue that ended less than this ago starts again at once, without a new interval. */
const STANDING_MEMORY_MS = 1000;
/** How much of the past the wall-time-per-item estimate keeps at each drain turn (~10 turns). */
const PER_ITEM_DECAY = 0.9;

/** A bounded FIFO of items with their enqueue times (the picture in the module docs). */
class Ring<T> {
  readonly #items: (T | undefined)[];
  readonly #at: Float64Array;
  head = 0;
  size = 0;

  constructor(readonly capacity: number) {
    this.#items = new Array<T | undefined>(capacity);
    this.#at = new Float64Array(capacity);
  }

  push(item: T, at: number): void {
    const slot = (this.head + this.size) % this.capacity;
    this.#items[slot] = item;
    this.#at[slot] = at;
    this.size++;
  }

  /** Enqueue time of the oldest item (call only when size > 0). */
  headAt(): number {
    return this.#at[this.head]!;
  }

  shift(): T {
    const item = this.#items[this.head] as T;
    this.#items[this.head] = undefined;
    this.head = (this.head + 1) % this.capacity;
    this.size--;
    return item;
  }
}

/**
 * One stage: a bounded queue, a worker set and its counters. The queue has two lanes: urgent items
 * (work that ends work: ACK, CANCEL, BYE) are served before normal ones and have their own bound.
 */
export class Stage<T> {
  readonly name: string;
  readonly capacity: number;
  readonly concurrency: number;
  readonly mode: "inline" | "deferred";
  readonly queueWait: Histogram = new Histogram();
  readonly serviceTime: Histogram = new Histogram();
  arrivals = 0;
  admitted = 0;
  completed = 0;
  readonly dropped: Record<string, number> = {};

  readonly #handler: (item: T) => void | Promise<void>;
  readonly #onError: (error: unknown, stage: string) => void;
  readonly #budgetMs: number;
  readonly #targetMs: number;
  readonly #deadlineMs: number;
  readonly #onLate: ((item: T, waitedMs: number) => void) | null;
  readonly #normal: Ring<T>;
  readonly #urgent: Ring<T>;
  #inFlight = 0;
  #sampled = 0;
  #scheduled = false;
  #draining = false;
  /**
   * Mean wall time (ms) per item taken while the queue stayed backlogged: the inverse of the rate
   * at which this stage really drains, with whatever else the event loop does in between.
   */
  #perItemMs = 0;
  /** Decaying sums of wall time and of items taken, whose ratio is `#perItemMs`. */
  #spanMs = 0;
  #spanItems = 0;
  /** When the last drain turn ended, and whether it left items waiting. */
  #turnEndAt = 0;
  #backlogged = false;
  /** When an item was last taken from the queue. */
  #tookAt = 0;
  /** CoDel state: since when every item taken waited over the target (0: the last did not). */
  #firstAboveAt = 0;
  #standing = false;
  #standingEndedAt = -Infinity;

  constructor(options: StageOptions<T>) {
    if (options.capacity < 1 || options.concurrency < 1) {
      throw new RangeError(
        `Cannot create stage ${options.name}: capacity and concurrency must be >= 1`,
      );
    }
    this.name = options.name;
    this.capacity = options.capacity;
    this.concurrency = options.concurrency;
    this.mode = options.mode ?? "inline";
    this.#budgetMs = options.budgetMs ?? 4;
    this.#targetMs = options.targetMs ?? Infinity;
    this.#deadlineMs = options.onLate !== undefined ? options.deadlineMs ?? Infinity : Infinity;
    this.#onLate = options.onLate ?? null;
    this.#handler = options.handler;
    this.#onError = options.onError ?? (() => {});
    this.#normal = new Ring<T>(options.capacity);
    this.#urgent = new Ring<T>(Math.max(16, options.capacity >> 3));
  }

  get #size(): number {
    return this.#normal.size + this.#urgent.size;
  }

  /** Items waiting. */
  get queueLength(): number {
    return this.#size;
  }

  /** Items in service. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** Free slots in the normal lane. */
  get free(): number {
    return this.capacity - this.#normal.size;
  }

  /** How long the oldest normal item has waited, in milliseconds (0 when none waits). */
  headAgeMs(at: number = now()): number {
    return this.#normal.size === 0 ? 0 : at - this.#normal.headAt();
  }

  /**
   * The queue delay a new item can expect, in milliseconds, the admission signal: the items waiting
   * times the measured wall time per item taken while the queue was backlogged; when nothing was
   * taken for {@link STUCK_MS} (the handler hangs), the head's age if larger. Predicted from the
   * queue rather than read off the head, it rises as soon as the queue does: a head-age signal lags
   * by the target itself, and a fast reader fills the queue with many targets' worth of work
   * meanwhile. Whether a delay over the target is refused is classify's decision (a burst that
   * drains soon is absorbed there).
   */
  queueDelayMs(at: number = now()): number {
    const size = this.#size;
    if (size === 0) return 0;
    const predicted = size * this.#perItemMs;
    if (at - this.#tookAt < STUCK_MS) return predicted;
    return Math.max(predicted, this.headAgeMs(at));
  }

  /**
   * Whether the queue is standing (CoDel's dropping state): every normal item taken over the last
   * 100 ms had waited longer than the target, or over it again within a second of the last
   * standing period. It ends when an item is taken after less than half the target, or the queue
   * empties. A burst, a GC pause or one long turn makes a few items wait, then the queue drains
   * below the target within the interval: not standing. Overload keeps it above.
   */
  get standing(): boolean {
    return this.#standing && this.#normal.size > 0;
  }

  /**
   * Offers an item; `urgent` ones are served first. Returns false when its lane is full: the item is
   * counted as dropped with reason `queue-full` and the caller decides what to answer (503, pause the
   * flow, drop the datagram).
   */
  offer(item: T, urgent = false): boolean {
    this.arrivals++;
    if (this.mode === "inline" && this.#size === 0 && this.#inFlight < this.concurrency) {
      this.admitted++;
      this.queueWait.observe(0);
      // Inline items are timed one in SAMPLE_EVERY: a clock read costs ~0.1 µs here, as much as
      // some stages' whole work, and the sampled histogram has the same shape and mean.
      this.#run(item, (this.#sampled++ & (SAMPLE_EVERY - 1)) === 0 ? now() : -1);
      return true;
    }
    const lane = urgent ? this.#urgent : this.#normal;
    if (lane.size >= lane.capacity) {
      this.drop("queue-full");
      return false;
    }
    this.admitted++;
    lane.push(item, now());
    this.#schedule();
    return true;
  }

  /** Counts an item this stage was offered but refused or discarded, by reason. */
  drop(reason: string): void {
    this.dropped[reason] = (this.dropped[reason] ?? 0) + 1;
  }

  /** The counters now. */
  snapshot(): StageSnapshot {
    return {
      name: this.name,
      arrivals: this.arrivals,
      admitted: this.admitted,
      completed: this.completed,
      dropped: { ...this.dropped },
      queueLength: this.#size,
      queueCapacity: this.capacity,
      queueDelayMs: this.queueDelayMs(),
      perItemMs: this.#perItemMs,
      standing: this.standing,
      inFlight: this.#inFlight,
      concurrency: this.concurrency,
      queueWait: {
        counts: [...this.queueWait.counts],
        sum: this.queueWait.sum,
        count: this.queueWait.count,
      },
      serviceTime: {
        counts: [...this.serviceTime.counts],
        sum: this.serviceTime.sum,
        count: this.serviceTime.count,
      },
    };
  }

  /** Resolves when nothing waits and nothing is in service. */
  async idle(): Promise<void> {
    while (this.#size > 0 || this.#inFlight > 0) {
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
  }

  #schedule(): void {
    if (this.#scheduled || this.#draining) return;
    this.#scheduled = true;
    setImmediate(this.#drainTurn);
  }

  readonly #drainTurn = (): void => {
    this.#scheduled = false;
    this.#drain();
  };

  #drain(): void {
    if (this.#draining) return;
    this.#draining = true;
    const start = now();
    const deferred = this.mode === "deferred";
    let taken = 0;
    while (this.#size > 0 && this.#inFlight < this.concurrency) {
      const t = now();
      if (deferred && t - start >= this.#budgetMs) break;
      const lane = this.#urgent.size > 0 ? this.#urgent : this.#normal;
      const waitMs = t - lane.headAt();
      const item = lane.shift();
      if (lane === this.#normal) {
        this.#observeWait(waitMs, lane.size, t);
        if (this.#standing && waitMs > this.#deadlineMs) {
          this.drop("late");
          try {
            this.#onLate!(item, waitMs);
          } catch (error) {
            this.#onError(error, this.name);
          }
          continue;
        }
      }
      taken++;
      this.queueWait.observe(waitMs / 1000);
      this.#run(item, t);
    }
    this.#draining = false;
    if (deferred) {
      const end = now();
      if (taken > 0) {
        this.#tookAt = end;
        // Backlogged since the last turn: the time since then was all this queue waiting its turn.
        // Otherwise the queue had emptied: only this turn's own time counts. Sums weighted by items,
        // so that a long pause in which few items were taken weighs by its length, not as a turn.
        const span = this.#backlogged ? end - this.#turnEndAt : end - start;
        this.#spanMs = this.#spanMs * PER_ITEM_DECAY + span;
        this.#spanItems = this.#spanItems * PER_ITEM_DECAY + taken;
        this.#perItemMs = this.#spanMs / this.#spanItems;
      }
      this.#turnEndAt = end;
      this.#backlogged = this.#size > 0;
    }
    if (this.#size > 0 && this.#inFlight < this.concurrency) this.#schedule();
  }

  /**
   * CoDel's state machine, fed with the wait of each normal item taken and the items still behind
   * it. As CoDel counts a sojourn over the target only while more than a packet is queued, a wait
   * with fewer than {@link MIN_BACKLOG} items behind it came from the event loop being busy
   * elsewhere (or the process descheduled), not from this queue: it ends a standing period as a
   * short wait does, since refusing work would not shorten it.
   */
  #observeWait(waitMs: number, behind: number, t: number): void {
    const threshold = this.#standing ? this.#targetMs / 2 : this.#targetMs;
    if (waitMs < threshold || behind < MIN_BACKLOG) {
      if (this.#standing) {
        this.#standing = false;
        this.#standingEndedAt = t;
      }
      this.#firstAboveAt = 0;
      return;
    }
    if (this.#standing) return;
    if (this.#firstAboveAt === 0) {
      this.#firstAboveAt = t;
      if (t - this.#standingEndedAt < STANDING_MEMORY_MS) this.#standing = true;
    } else if (t - this.#firstAboveAt >= STANDING_INTERVAL_MS) {
      this.#standing = true;
    }
  }

  /** Runs the handler; `start` is when service began (-1: not timed). */
  #run(item: T, start: number): void {
    this.#inFlight++;
    let result: void | Promise<void>;
    try {
      result = this.#handler(item);
    } catch (error) {
      this.#finish(start, error);
      return;
    }
    if (result instanceof Promise) {
      result.then(() => this.#finish(start, undefined), (error) => this.#finish(start, error));
    } else {
      this.#finish(start, undefined);
    }
  }

  #finish(start: number, error: unknown): void {
    this.#inFlight--;
    if (start >= 0) this.serviceTime.observe((now() - start) / 1000);
    if (error !== undefined) {
      this.drop("handler-error");
      this.#onError(error, this.name);
    } else {
      this.completed++;
    }
    if (this.#size > 0 && !this.#draining) {
      if (this.mode === "inline") this.#drain();
      else this.#schedule();
    }
  }
}
