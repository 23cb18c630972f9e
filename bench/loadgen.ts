/**
 * The load generator's coordinator: starts worker processes (`deno run` subprocesses of
 * {@linkcode ./loadgen_worker.ts}), splits a load between them, and merges their counters
 * and histograms. Processes, not Web Workers, because a process may open at most 20,000
 * files here: each worker stays below {@linkcode MAX_SOCKETS_PER_WORKER} sockets.
 *
 * @example
 * ```ts
 * const gen = await LoadGen.start(2);
 * try {
 *   const r = await gen.run({ mode: "udp", host: "127.0.0.1", port: 5070, loop: "closed", outstanding: 200 });
 *   console.log(rateOf(r), Histogram.fromJSON(r.latency).summary());
 * } finally {
 *   await gen.stop();
 * }
 * ```
 *
 * @module
 */

import { Histogram } from "./hist.ts";
import type {
  Command,
  OpenResult,
  OpenSpec,
  RefreshSpec,
  Reply,
  RunResult,
  RunSpec,
} from "./loadgen_types.ts";

/** Sockets one worker process holds at most (the hard file limit is 20,000). */
export const MAX_SOCKETS_PER_WORKER = 18_000;

const WORKER_URL = new URL("./loadgen_worker.ts", import.meta.url);

/** The worker's command handler (named here so `deno check bench/main.ts` checks the worker). */
export type WorkerHandler = typeof import("./loadgen_worker.ts")["handle"];

/** Defaults for every {@linkcode RunSpec} field the caller leaves out. */
export const RUN_DEFAULTS: Omit<RunSpec, "mode" | "host" | "port"> = {
  loop: "closed",
  outstanding: 200,
  rate: 1000,
  warmupMs: 500,
  durationMs: 3000,
  maxRequests: 10_000_000,
  timeoutMs: 2000,
  userBase: 0,
  userCount: 100_000,
  connections: 1,
  holdMax: 5000,
  sourceAddrs: [],
  retransmit: true,
  maxOutstanding: 60_000,
};

/** A caller's run request: transport, server, and any fields to override. */
export type RunRequest = Pick<RunSpec, "mode" | "host" | "port"> & Partial<RunSpec>;

/** One worker process and its reply channel. */
class WorkerProc {
  readonly child: Deno.ChildProcess;
  readonly writer: WritableStreamDefaultWriter<Uint8Array>;
  readonly waiting = new Map<number, (r: Reply) => void>();
  readonly done: Promise<void>;

  constructor(readonly index: number) {
    this.child = new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-all", "--unstable-net", WORKER_URL.href],
      stdin: "piped",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    this.writer = this.child.stdin.getWriter();
    this.done = this.read();
  }

  async read(): Promise<void> {
    const dec = new TextDecoder();
    let buf = "";
    for await (const chunk of this.child.stdout) {
      buf += dec.decode(chunk, { stream: true });
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let r: Reply;
        try {
          r = JSON.parse(line) as Reply;
        } catch {
          continue; // not ours
        }
        const w = this.waiting.get(r.id);
        if (w) {
          this.waiting.delete(r.id);
          w(r);
        }
      }
    }
    for (const [id, w] of this.waiting) w({ id, ok: false, error: "worker exited" });
    this.waiting.clear();
  }

  async call(cmd: Command): Promise<Reply> {
    const p = new Promise<Reply>((resolve) => this.waiting.set(cmd.id, resolve));
    await this.writer.write(new TextEncoder().encode(JSON.stringify(cmd) + "\n"));
    return p;
  }
}

let nextId = 1;

/** Merges per-worker run results: counts add, histograms merge, wall time is the longest. */
export function mergeRuns(runs: RunResult[]): RunResult {
  const lat = new Histogram(), lat503 = new Histogram(), lag = new Histogram();
  const statuses: Record<string, number> = {};
  const out: RunResult = {
    sent: 0,
    ok: 0,
    rejected503: 0,
    failed: 0,
    timeouts: 0,
    connectErrors: 0,
    retransmits: 0,
    skipped: 0,
    measuredMs: 0,
    latency: lat.toJSON(),
    latency503: lat503.toJSON(),
    statuses,
    cpuUserMs: 0,
    cpuSystemMs: 0,
    wallMs: 0,
    loopLag: lag.toJSON(),
  };
  for (const r of runs) {
    out.sent += r.sent;
    out.ok += r.ok;
    out.rejected503 += r.rejected503;
    out.failed += r.failed;
    out.timeouts += r.timeouts;
    out.connectErrors += r.connectErrors;
    out.retransmits += r.retransmits;
    out.skipped += r.skipped;
    out.measuredMs = Math.max(out.measuredMs, r.measuredMs);
    out.cpuUserMs += r.cpuUserMs;
    out.cpuSystemMs += r.cpuSystemMs;
    out.wallMs = Math.max(out.wallMs, r.wallMs);
    lat.merge(Histogram.fromJSON(r.latency));
    lat503.merge(Histogram.fromJSON(r.latency503));
    lag.merge(Histogram.fromJSON(r.loopLag));
    for (const [k, v] of Object.entries(r.statuses)) statuses[k] = (statuses[k] ?? 0) + v;
  }
  out.latency = lat.toJSON();
  out.latency503 = lat503.toJSON();
  out.loopLag = lag.toJSON();
  return out;
}

/** 2xx responses per second over the measuring window. */
export function rateOf(r: RunResult): number {
  return r.measuredMs > 0 ? (r.ok * 1000) / r.measuredMs : 0;
}

/** Share of measured requests answered 2xx, in [0, 1] (1 when nothing was sent). */
export function successOf(r: RunResult): number {
  const total = r.sent + r.skipped;
  return total > 0 ? r.ok / total : 1;
}

/** Generator CPU during a run, in cores (1.0 = one core busy for the whole wall time). */
export function generatorCores(
  r: { cpuUserMs: number; cpuSystemMs: number; wallMs: number },
): number {
  return r.wallMs > 0 ? (r.cpuUserMs + r.cpuSystemMs) / r.wallMs : 0;
}

/** Merges per-worker open results. */
export function mergeOpens(rs: OpenResult[]): OpenResult {
  const setup = new Histogram(), first = new Histogram();
  const out: OpenResult = {
    opened: 0,
    failed: 0,
    held: 0,
    firstError: null,
    setup: setup.toJSON(),
    firstExchange: first.toJSON(),
    wallMs: 0,
    cpuUserMs: 0,
    cpuSystemMs: 0,
  };
  for (const r of rs) {
    out.opened += r.opened;
    out.failed += r.failed;
    out.held += r.held;
    out.firstError ??= r.firstError;
    out.wallMs = Math.max(out.wallMs, r.wallMs);
    out.cpuUserMs += r.cpuUserMs;
    out.cpuSystemMs += r.cpuSystemMs;
    setup.merge(Histogram.fromJSON(r.setup));
    first.merge(Histogram.fromJSON(r.firstExchange));
  }
  out.setup = setup.toJSON();
  out.firstExchange = first.toJSON();
  return out;
}

/** A set of load-generator worker processes. Always {@linkcode LoadGen.stop} it. */
export class LoadGen {
  private constructor(private readonly workers: WorkerProc[]) {}

  /** Starts `processes` workers. */
  static start(processes: number): Promise<LoadGen> {
    const ws = Array.from({ length: Math.max(1, processes) }, (_, i) => new WorkerProc(i));
    return Promise.resolve(new LoadGen(ws));
  }

  /** Number of worker processes. */
  get size(): number {
    return this.workers.length;
  }

  /** Process ids of the workers (to measure their memory and CPU). */
  get pids(): number[] {
    return this.workers.map((w) => w.child.pid);
  }

  private async all<T>(
    make: (w: WorkerProc, i: number) => Command,
    pick: (r: Reply) => T,
  ): Promise<T[]> {
    const replies = await Promise.all(this.workers.map((w, i) => w.call(make(w, i))));
    return replies.map((r, i) => {
      if (!r.ok) throw new Error(`Load generator worker ${i} failed: ${r.error}`);
      return pick(r);
    });
  }

  /**
   * Runs one REGISTER load split over the workers: rate, outstanding requests, connections,
   * held connections and the user range are divided; every worker gets its own user slice.
   */
  async run(req: RunRequest): Promise<RunResult> {
    const spec: RunSpec = { ...RUN_DEFAULTS, ...req };
    const n = this.workers.length;
    const share = (v: number): number => Math.max(1, Math.round(v / n));
    const slice = Math.max(1, Math.floor(spec.userCount / n));
    const runs = await this.all((_w, i) => ({
      op: "run",
      id: nextId++,
      worker: i,
      spec: {
        ...spec,
        rate: spec.rate / n,
        outstanding: share(spec.outstanding),
        connections: share(spec.connections),
        holdMax: share(spec.holdMax),
        maxRequests: share(spec.maxRequests),
        maxOutstanding: share(spec.maxOutstanding),
        userBase: spec.userBase + i * slice,
        userCount: slice,
        sourceAddrs: spec.sourceAddrs.length >= n
          ? spec.sourceAddrs.filter((_a, k) => k % n === i)
          : spec.sourceAddrs,
      },
    }), (r) => ("run" in r ? r.run : mergeRuns([])));
    return mergeRuns(runs);
  }

  /** Opens `spec.count` more held flows, split over the workers (each its own source address). */
  async open(spec: OpenSpec): Promise<OpenResult> {
    const n = this.workers.length;
    const per = Math.floor(spec.count / n);
    const opens = await this.all((_w, i) => ({
      op: "open",
      id: nextId++,
      worker: i,
      spec: {
        ...spec,
        count: i === n - 1 ? spec.count - per * (n - 1) : per,
        concurrency: Math.max(1, Math.round(spec.concurrency / n)),
        maxFailures: Math.max(1, Math.ceil(spec.maxFailures / n)),
        userBase: spec.userBase + i * 10_000_000,
        sourceAddrs: spec.sourceAddrs.length >= n
          ? spec.sourceAddrs.filter((_a, k) => k % n === i)
          : spec.sourceAddrs,
      },
    }), (r) => ("open" in r ? r.open : mergeOpens([])));
    return mergeOpens(opens);
  }

  /** Sends requests over held flows at `spec.rate` in total; latency per request. */
  async refresh(spec: RefreshSpec): Promise<RunResult> {
    const n = this.workers.length;
    const runs = await this.all((_w, i) => ({
      op: "refresh",
      id: nextId++,
      worker: i,
      spec: { ...spec, rate: spec.rate / n },
    }), (r) => ("run" in r ? r.run : mergeRuns([])));
    return mergeRuns(runs);
  }

  /** Closes every held flow; returns how many were closed. */
  async close(): Promise<number> {
    const counts = await this.all(
      () => ({ op: "close", id: nextId++ }),
      (r) => ("closed" in r ? r.closed : 0),
    );
    return counts.reduce((a, b) => a + b, 0);
  }

  /** Stops every worker (asks, then kills after 3 s). Safe to call twice. */
  async stop(): Promise<void> {
    await Promise.all(this.workers.map(async (w) => {
      const asked = w.call({ op: "exit", id: nextId++ }).catch(() => undefined);
      const timer = setTimeout(() => {
        try {
          w.child.kill("SIGKILL");
        } catch { /* already gone */ }
      }, 3000);
      await Promise.race([asked, w.child.status]);
      await w.child.status;
      clearTimeout(timer);
      await w.writer.close().catch(() => undefined);
      await w.done.catch(() => undefined);
    }));
  }
}
