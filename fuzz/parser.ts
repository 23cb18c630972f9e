/**
 * Parser mode: mutates corpus messages and runs each through {@linkcode checkInput}, timing every
 * input and sampling memory.
 *
 * @module
 */

import { checkInput, type Failure } from "./check.ts";
import { loadCorpus, saveCrash } from "./corpus.ts";
import { mutate } from "./mutate.ts";
import { Rng } from "./prng.ts";

/** Options of {@linkcode fuzzParser}. */
export interface ParserFuzzOptions {
  readonly seed: number;
  /** Stop after this many seconds. @default 10 */
  readonly seconds?: number;
  /** Stop after this many inputs. @default unlimited */
  readonly maxInputs?: number;
  /** An input slower than this (ms, best of three runs) is a hang. @default 50 */
  readonly slowMs?: number;
  /** Resident memory above this (MiB) is a failure. @default 1024 */
  readonly maxRssMiB?: number;
  /** Keep failing inputs in `tests/fixtures/fuzz/crashes/`. @default true */
  readonly save?: boolean;
  /** Called about once a second. */
  readonly progress?: (stats: ParserFuzzStats) => void;
}

/** What a run found. */
export interface ParserFuzzStats {
  inputs: number;
  seconds: number;
  /** Failing inputs by failure kind (first input of each kind is kept). */
  failures: Map<string, { count: number; example: Uint8Array; detail: string; file?: string }>;
  /** Slowest input, in ms. */
  slowestMs: number;
  rssStartMiB: number;
  rssMaxMiB: number;
}

const MiB = 1024 * 1024;

/** Runs the parser fuzzer. */
export function fuzzParser(options: ParserFuzzOptions): ParserFuzzStats {
  const corpus = loadCorpus();
  const rng = new Rng(options.seed);
  const slowMs = options.slowMs ?? 50;
  const maxRss = (options.maxRssMiB ?? 1024) * MiB;
  const deadline = performance.now() + (options.seconds ?? 10) * 1000;
  const maxInputs = options.maxInputs ?? Infinity;
  const save = options.save ?? true;
  const rss0 = Deno.memoryUsage().rss;
  const stats: ParserFuzzStats = {
    inputs: 0,
    seconds: 0,
    failures: new Map(),
    slowestMs: 0,
    rssStartMiB: rss0 / MiB,
    rssMaxMiB: rss0 / MiB,
  };
  const t0 = performance.now();
  let nextProgress = t0 + 1000;

  const record = (input: Uint8Array, f: Failure, ops: readonly string[]): void => {
    const seen = stats.failures.get(f.kind);
    if (seen !== undefined) {
      seen.count++;
      return;
    }
    const entry: { count: number; example: Uint8Array; detail: string; file?: string } = {
      count: 1,
      example: input,
      detail: f.detail,
    };
    if (save) entry.file = saveCrash(input, { ...f, seed: options.seed, ops });
    stats.failures.set(f.kind, entry);
  };

  while (stats.inputs < maxInputs) {
    const { input, ops } = mutate(rng, corpus);
    // A sub-generator per input so a slow-input re-run sees the same chunking.
    const inputSeed = rng.u32();
    const first = checkInput(input, new Rng(inputSeed));
    const failure = first.failure;
    let ms = first.ms;
    stats.inputs++;
    if (failure !== null) record(input, failure, ops);
    if (ms > slowMs) {
      // Confirm: a GC pause or a descheduled process is not a hang.
      for (let k = 0; k < 2 && ms > slowMs; k++) {
        ms = Math.min(ms, checkInput(input, new Rng(inputSeed)).ms);
      }
      if (ms > slowMs) {
        record(input, { kind: "slow", detail: `${ms.toFixed(1)} ms for ${input.length} B` }, ops);
      }
    }
    if (ms > stats.slowestMs) stats.slowestMs = ms;
    if ((stats.inputs & 1023) === 0) {
      const now = performance.now();
      const rss = Deno.memoryUsage().rss;
      if (rss / MiB > stats.rssMaxMiB) stats.rssMaxMiB = rss / MiB;
      if (rss > maxRss) {
        record(input, {
          kind: "memory",
          detail: `rss ${(rss / MiB).toFixed(0)} MiB > ${maxRss / MiB}`,
        }, ops);
        break;
      }
      if (now >= deadline) break;
      if (options.progress !== undefined && now >= nextProgress) {
        nextProgress = now + 1000;
        stats.seconds = (now - t0) / 1000;
        options.progress(stats);
      }
    }
  }
  stats.seconds = (performance.now() - t0) / 1000;
  return stats;
}
