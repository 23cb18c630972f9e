/**
 * A log-bucketed latency histogram in the manner of HdrHistogram: values are integer
 * microseconds; below 128 µs each value has its own bucket, above that every power of two
 * is split into 64 linear sub-buckets, so a recorded value is known within 1/64 (~1.6%).
 *
 * @module
 */

const SUB_BITS = 6;
const SUB = 1 << SUB_BITS; // 64 sub-buckets per octave
const MAX_VALUE = 2 ** 31 - 1; // ~35 minutes in µs
const BUCKETS = SUB * (31 - SUB_BITS + 1);

function indexOf(v: number): number {
  if (v < 2 * SUB) return v;
  const shift = 31 - Math.clz32(v) - SUB_BITS;
  return SUB * (shift + 1) + ((v >>> shift) - SUB);
}

/** Highest value that falls in bucket `i` (HDR reports the highest equivalent value). */
function upperOf(i: number): number {
  if (i < 2 * SUB) return i;
  const shift = Math.floor(i / SUB) - 1;
  const m = (i % SUB) + SUB;
  return ((m + 1) << shift) - 1;
}

/** Serialised form of a {@linkcode Histogram}: sparse `[bucketIndex, count]` pairs. */
export interface HistogramJson {
  /** Unit of the recorded values. */
  unit: "us";
  /** Number of recorded values. */
  count: number;
  /** Smallest recorded value, or 0 when empty. */
  min: number;
  /** Largest recorded value, or 0 when empty. */
  max: number;
  /** Sum of recorded values. */
  sum: number;
  /** Non-empty buckets as `[index, count]`. */
  buckets: [number, number][];
}

/** Percentile summary in milliseconds, the form the reports print. */
export interface LatencySummary {
  /** Number of samples. */
  count: number;
  /** Mean in ms. */
  mean_ms: number | null;
  /** Median in ms. */
  p50_ms: number | null;
  /** 90th percentile in ms. */
  p90_ms: number | null;
  /** 99th percentile in ms. */
  p99_ms: number | null;
  /** 99.9th percentile in ms. */
  p999_ms: number | null;
  /** Largest sample in ms. */
  max_ms: number | null;
}

/** Log-bucketed histogram of integer microsecond values; mergeable across processes. */
export class Histogram {
  /** Counts per bucket. */
  readonly counts: Float64Array = new Float64Array(BUCKETS);
  /** Number of recorded values. */
  count = 0;
  /** Smallest recorded value. */
  min = Infinity;
  /** Largest recorded value. */
  max = 0;
  /** Sum of recorded values. */
  sum = 0;

  /** Records one value in microseconds (rounded, clamped to [0, 2^31)). */
  record(us: number): void {
    let v = Math.round(us);
    if (!(v >= 0)) v = 0;
    if (v > MAX_VALUE) v = MAX_VALUE;
    this.counts[indexOf(v)]! += 1;
    this.count++;
    this.sum += v;
    if (v < this.min) this.min = v;
    if (v > this.max) this.max = v;
  }

  /** Adds every value of `other` into this histogram. */
  merge(other: Histogram): this {
    for (let i = 0; i < BUCKETS; i++) this.counts[i]! += other.counts[i]!;
    this.count += other.count;
    this.sum += other.sum;
    if (other.min < this.min) this.min = other.min;
    if (other.max > this.max) this.max = other.max;
    return this;
  }

  /** Value (µs) at percentile `p` in [0, 100]; highest equivalent value of its bucket. */
  percentile(p: number): number {
    if (this.count === 0) return 0;
    const rank = Math.max(1, Math.ceil((p / 100) * this.count));
    let seen = 0;
    for (let i = 0; i < BUCKETS; i++) {
      seen += this.counts[i]!;
      if (seen >= rank) return Math.min(upperOf(i), this.max);
    }
    return this.max;
  }

  /** Percentiles in milliseconds (null when empty). */
  summary(): LatencySummary {
    const ms = (us: number): number => Math.round(us) / 1000;
    if (this.count === 0) {
      return {
        count: 0,
        mean_ms: null,
        p50_ms: null,
        p90_ms: null,
        p99_ms: null,
        p999_ms: null,
        max_ms: null,
      };
    }
    return {
      count: this.count,
      mean_ms: ms(this.sum / this.count),
      p50_ms: ms(this.percentile(50)),
      p90_ms: ms(this.percentile(90)),
      p99_ms: ms(this.percentile(99)),
      p999_ms: ms(this.percentile(99.9)),
      max_ms: ms(this.max),
    };
  }

  /** Sparse JSON form. */
  toJSON(): HistogramJson {
    const buckets: [number, number][] = [];
    for (let i = 0; i < BUCKETS; i++) {
      const c = this.counts[i]!;
      if (c > 0) buckets.push([i, c]);
    }
    return {
      unit: "us",
      count: this.count,
      min: this.count ? this.min : 0,
      max: this.max,
      sum: this.sum,
      buckets,
    };
  }

  /** Rebuilds a histogram from its JSON form. */
  static fromJSON(j: HistogramJson): Histogram {
    const h = new Histogram();
    for (const [i, c] of j.buckets) if (i >= 0 && i < BUCKETS) h.counts[i] = c;
    h.count = j.count;
    h.min = j.count ? j.min : Infinity;
    h.max = j.max;
    h.sum = j.sum;
    return h;
  }
}
