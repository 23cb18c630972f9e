/**
 * The bench's scenarios: `register`, `conns`, `overload`, `stages`, `peer`, `sipp`. Each
 * starts the targets it needs, drives them with {@linkcode LoadGen}, stops them whatever
 * happens, and returns plain JSON with units in the key names (`_per_s`, `_ms`, `_bytes`,
 * `_cores`).
 *
 * @module
 */

import { Histogram } from "./hist.ts";
import type { LatencySummary } from "./hist.ts";
import { generatorCores, LoadGen, MAX_SOCKETS_PER_WORKER, rateOf, successOf } from "./loadgen.ts";
import type { RunRequest } from "./loadgen.ts";
import type { RunResult, TransportMode } from "./loadgen_types.ts";
import {
  cpuMeter,
  kernelDelta,
  kernelMemory,
  pinTree,
  treeMemory,
  treesMemory,
} from "./measure.ts";
import type { CpuUse, KernelMemory, TreeMemory } from "./measure.ts";
import { kamailioAvailable, startKamailio } from "./peer_kamailio.ts";
import { citysipAvailable, startCitysip } from "./target_citysip.ts";
import { startEchoServer } from "./echo_server.ts";
import { freePort } from "./target.ts";
import type { StoreMode, Target } from "./target.ts";
import { runSipp, sippAvailable } from "./sipp.ts";
import type { SippResult } from "./sipp.ts";

/** Names of the scenarios, in the order a full run performs them. */
// `conns` runs last: closing 100,000s of flows leaves as many sockets in TIME_WAIT for a minute.
export const SCENARIOS = [
  "register",
  "workers",
  "overload",
  "stages",
  "peer",
  "sipp",
  "conns",
] as const;
/** A scenario name. */
export type ScenarioName = typeof SCENARIOS[number];
/** A server under test. */
export type TargetName = "citysip" | "kamailio";

/** Sizes and durations of a run; `quick` is the smoke pass. */
export interface Plan {
  /** Smoke pass. */
  quick: boolean;
  /** Load-generator processes for REGISTER loads. */
  procs: number;
  /** Warm-up before each measured round, ms. */
  warmupMs: number;
  /** Closed-loop round, ms. */
  closedMs: number;
  /** Closed-loop rounds per mode (the median is reported). */
  closedRounds: number;
  /** Requests in flight in the closed loop. */
  outstanding: number;
  /** Each rate-sweep and overload step, ms. */
  stepMs: number;
  /** Rate sweep, as fractions of the closed-loop maximum. */
  sweep: number[];
  /** Overload steps, as multiples of the sustainable rate. */
  overload: number[];
  /** A sweep step passes with p99 at most this, ms. */
  p99BoundMs: number;
  /** A sweep step passes with at least this success ratio. */
  minSuccess: number;
  /**
   * TCP persistent: connections in total. SO_REUSEPORT places each on a worker by a hash, so 16 may
   * load 2 workers unevenly (10/6 as often as not); 64 spread better but cost the generator twice
   * the CPU (0.2 -> 0.4 of a core) on the cores it shares with the server, so 16 stay.
   */
  tcpConnections: number;
  /** TCP with open: connections held at most, in total. */
  holdMax: number;
  /** Held-flow levels for Kamailio (its file limit is 20,000). */
  connsKamailio: number[];
  /** Held-flow levels for citysip. */
  connsCitysip: number[];
  /** Held-flow levels for the echo server. */
  connsEcho: number[];
  /** REGISTER rate over held flows at each level, per s. */
  connsRefreshRate: number;
  /** SIPp calls per round. */
  sippCalls: number;
}

/** The plans of a quick and a full run. */
export function makePlan(quick: boolean, procs: number): Plan {
  return quick
    ? {
      quick,
      procs,
      warmupMs: 200,
      closedMs: 800,
      closedRounds: 1,
      outstanding: 200,
      stepMs: 600,
      sweep: [0.8],
      overload: [1, 3],
      p99BoundMs: 50,
      minSuccess: 0.999,
      tcpConnections: 16,
      holdMax: 2000,
      connsKamailio: [300],
      connsCitysip: [300],
      connsEcho: [300],
      connsRefreshRate: 200,
      sippCalls: 5000,
    }
    : {
      quick,
      procs,
      warmupMs: 1000,
      closedMs: 4000,
      closedRounds: 3,
      outstanding: 200,
      stepMs: 4000,
      sweep: [0.25, 0.5, 0.8, 0.9, 1.0, 1.1],
      overload: [0.5, 1, 2, 3],
      p99BoundMs: 50,
      minSuccess: 0.999,
      tcpConnections: 16,
      holdMax: 5000,
      connsKamailio: [1000, 5000, 10000, 15000],
      connsCitysip: [10_000, 50_000, 100_000, 200_000, 300_000],
      connsEcho: [10_000, 50_000, 100_000],
      connsRefreshRate: 1000,
      sippCalls: 150_000,
    };
}

/** Shared state of one bench run. */
export interface Context {
  /** Sizes and durations. */
  plan: Plan;
  /** Targets selected on the command line. */
  targets: TargetName[];
  /** Why a target cannot run, if it cannot. */
  unavailable: Partial<Record<TargetName, string>>;
  /** Progress output. */
  log: (msg: string) => void;
  /** Results so far, by scenario (a later scenario may reuse an earlier one's). */
  results: Partial<Record<ScenarioName, unknown>>;
}

/** One measured round, reduced to figures (the merged histograms are kept as raw data). */
export interface Round {
  /** Transport mode. */
  mode: TransportMode;
  /** `closed` or `open`. */
  loop: "closed" | "open";
  /** Rate asked for (open loop), per s. */
  target_rate_per_s: number | null;
  /** Requests actually sent per s while measuring. */
  offered_per_s: number;
  /** 2xx per s while measuring. */
  goodput_per_s: number;
  /** 2xx / (sent + skipped). */
  success_ratio: number;
  /** Latency of 2xx responses. */
  latency: LatencySummary;
  /** Latency of 503 responses. */
  latency_503: LatencySummary;
  /** Counters. */
  sent: number;
  /** 2xx. */
  ok: number;
  /** 503. */
  rejected_503: number;
  /** Other failures (status >= 300). */
  failed: number;
  /** No answer within the time limit. */
  timeouts: number;
  /** Connect errors and broken connections. */
  connect_errors: number;
  /** UDP retransmissions. */
  retransmits: number;
  /** Requests the generator could not send (its in-flight cap). */
  skipped: number;
  /** Load generator CPU, cores. */
  generator_cores: number;
  /** p99 of the generator's event-loop lag, ms (high: the generator was saturated). */
  generator_loop_lag_p99_ms: number | null;
  /**
   * Why the round says more about the generator (or the machine) than the server, or null:
   * it sent under 95% of the asked rate, or its event loop lagged by over 20 ms at p99.
   */
  generator_limited: string | null;
  /** CPU used by none of server, generator and PostgreSQL (other work on the box), cores. */
  other_cores: number | null;
  /** Server and machine CPU. */
  cpu: CpuUse;
  /** Merged raw counters and histograms. */
  raw: RunResult;
}

const r2 = (x: number): number => Math.round(x * 100) / 100;

function toRound(req: RunRequest, r: RunResult, cpu: CpuUse): Round {
  const secs = r.measuredMs / 1000;
  const offered = secs > 0 ? r.sent / secs : 0;
  const lag = Histogram.fromJSON(r.loopLag).summary().p99_ms;
  const gen = generatorCores(r);
  const limits: string[] = [];
  if (req.loop === "open" && req.rate && offered < 0.95 * req.rate) {
    limits.push(`offered ${Math.round(offered)}/s of ${Math.round(req.rate)}/s asked`);
  }
  if (lag !== null && lag > 20) limits.push(`event-loop lag p99 ${lag} ms`);
  return {
    mode: req.mode,
    loop: req.loop ?? "closed",
    target_rate_per_s: req.loop === "open" ? r2(req.rate ?? 0) : null,
    offered_per_s: Math.round(offered),
    goodput_per_s: Math.round(rateOf(r)),
    success_ratio: Math.round(successOf(r) * 100000) / 100000,
    latency: Histogram.fromJSON(r.latency).summary(),
    latency_503: Histogram.fromJSON(r.latency503).summary(),
    sent: r.sent,
    ok: r.ok,
    rejected_503: r.rejected503,
    failed: r.failed,
    timeouts: r.timeouts,
    connect_errors: r.connectErrors,
    retransmits: r.retransmits,
    skipped: r.skipped,
    generator_cores: r2(gen),
    generator_loop_lag_p99_ms: lag,
    generator_limited: limits.length ? limits.join("; ") : null,
    other_cores: cpu.server_cores === null ? null : r2(
      Math.max(0, cpu.machine_busy_cores - cpu.server_cores - gen - (cpu.postgres_cores ?? 0)),
    ),
    cpu,
    raw: r,
  };
}

async function measuredRun(gen: LoadGen, t: Target, req: RunRequest): Promise<Round> {
  const meter = cpuMeter(t.pid);
  const r = await gen.run(req);
  return toRound(req, r, meter());
}

function describe(r: Round): string {
  return `${r.goodput_per_s}/s ok=${r.success_ratio} p50=${r.latency.p50_ms}ms p99=${r.latency.p99_ms}ms ` +
    `gen=${r.generator_cores} server=${r.cpu.server_cores} pg=${r.cpu.postgres_cores} other=${r.other_cores} cores` +
    (r.generator_limited ? ` [generator-limited: ${r.generator_limited}]` : "");
}

/**
 * The closed-loop measure of one mode: `plan.closedRounds` rounds of `plan.outstanding` requests in
 * flight, the k-th with users from `req.userBase + k * userStep`, each logged as `label #k`. The
 * median round by goodput stands for the mode.
 */
async function closedLoop(
  ctx: Context,
  gen: LoadGen,
  t: Target,
  req: RunRequest,
  userStep: number,
  label: string,
): Promise<{ rounds: Round[]; median: Round }> {
  const plan = ctx.plan;
  const rounds: Round[] = [];
  for (let k = 0; k < plan.closedRounds; k++) {
    const r = await measuredRun(gen, t, {
      ...req,
      userBase: (req.userBase ?? 0) + k * userStep,
      loop: "closed",
      outstanding: plan.outstanding,
      durationMs: plan.closedMs,
    });
    rounds.push(r);
    ctx.log(`${label} #${k + 1}: ${describe(r)}`);
  }
  const median = [...rounds].sort((a, b) => a.goodput_per_s - b.goodput_per_s)[
    Math.floor(rounds.length / 2)
  ]!;
  return { rounds, median };
}

/** Starts `name` in `store` mode, runs `fn`, stops it whatever happens. */
export async function withTarget<T>(
  name: TargetName | "echo",
  store: StoreMode,
  fn: (t: Target) => Promise<T>,
  echoProcesses = 1,
  workers?: number,
): Promise<T> {
  const t = name === "kamailio"
    ? await startKamailio({ store })
    : name === "citysip"
    ? await startCitysip(workers === undefined ? { store } : { store, workers })
    : await startEchoServer(await freePort(5270), echoProcesses);
  try {
    return await fn(t);
  } finally {
    await t.stop();
  }
}

/** Whether a target can run in a store mode; the reason when not. */
export function availability(name: TargetName, store: StoreMode): string | null {
  const a = name === "kamailio" ? kamailioAvailable(store) : citysipAvailable();
  return a.ok ? null : a.reason;
}

/** Results of the `register` scenario for one mode. */
export interface ModeResult {
  /** Closed-loop maximum: the median round. */
  closed: Round;
  /** Goodput of every closed-loop round, per s. */
  closed_rounds: number[];
  /** Open-loop rate sweep. */
  sweep: Round[];
  /** Highest swept rate that passed (success and p99 bound), with its round. */
  sustainable_per_s: number | null;
  /** p99 at 80% of the closed-loop maximum, ms. */
  p99_ms_at_80pct: number | null;
}

/** Modes measured with each store. */
export const MODES_BY_STORE: Record<StoreMode, TransportMode[]> = {
  memory: ["udp", "tcp_persistent", "tcp_with_open", "tcp_per_transaction"],
  postgres: ["udp", "tcp_persistent"],
};

function baseRequest(plan: Plan, t: Target, mode: TransportMode, userBase: number): RunRequest {
  return {
    mode,
    host: t.host,
    port: t.port,
    warmupMs: plan.warmupMs,
    timeoutMs: 2000,
    userBase,
    userCount: 200_000,
    connections: plan.tcpConnections,
    holdMax: plan.holdMax,
    retransmit: true,
    // A connection per request: spread over 64 source addresses, as many clients would be
    // (and so that TIME_WAIT never exhausts one address's ports).
    sourceAddrs: mode === "tcp_with_open" || mode === "tcp_per_transaction"
      ? Array.from({ length: 64 }, (_, i) => `127.0.${2 + (i >> 5)}.${1 + (i & 31)}`)
      : [],
  };
}

/** The `register` measurements of one target in one store mode. */
export async function registerTarget(
  ctx: Context,
  name: TargetName,
  store: StoreMode,
): Promise<Record<string, ModeResult> | { not_measured: string }> {
  const why = availability(name, store);
  if (why) return { not_measured: why };
  const plan = ctx.plan;
  const gen = await LoadGen.start(plan.procs);
  try {
    // citysip on every core, as Kamailio runs its children on both (the workers scenario shows 1 vs 2).
    const workers = name === "citysip" ? Math.max(1, navigator.hardwareConcurrency) : undefined;
    return await withTarget(
      name,
      store,
      async (t) => {
        const out: Record<string, ModeResult> = {};
        let base = 0;
        for (const mode of MODES_BY_STORE[store]) {
          base += 1_000_000;
          const req = baseRequest(plan, t, mode, base);
          const { rounds, median: closed } = await closedLoop(
            ctx,
            gen,
            t,
            req,
            250_000,
            `register ${name}/${store} ${mode} closed`,
          );
          const cap = Math.max(50, closed.goodput_per_s);
          const sweep: Round[] = [];
          let sustainable: number | null = null;
          let p80: number | null = null;
          for (const f of plan.sweep) {
            const rate = Math.round(cap * f);
            const round = await measuredRun(gen, t, {
              ...req,
              loop: "open",
              rate,
              durationMs: plan.stepMs,
            });
            sweep.push(round);
            const pass = round.success_ratio >= plan.minSuccess &&
              (round.latency.p99_ms ?? Infinity) <= plan.p99BoundMs &&
              round.offered_per_s >= 0.95 * rate;
            if (pass && (sustainable === null || round.goodput_per_s > sustainable)) {
              sustainable = round.goodput_per_s;
            }
            if (Math.abs(f - 0.8) < 1e-9) p80 = round.latency.p99_ms;
            ctx.log(
              `register ${name}/${store} ${mode} @${rate}/s: ${describe(round)} ${
                pass ? "pass" : "FAIL"
              }`,
            );
          }
          out[mode] = {
            closed,
            closed_rounds: rounds.map((r) => r.goodput_per_s),
            sweep,
            sustainable_per_s: sustainable,
            p99_ms_at_80pct: p80,
          };
        }
        return out;
      },
      1,
      workers,
    );
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    ctx.log(`register ${name}/${store}: ${msg}`);
    return { not_measured: msg.split("\n")[0] ?? msg };
  } finally {
    await gen.stop();
  }
}

/** `register`: each selected target, memory and PostgreSQL stores. */
export async function scenarioRegister(
  ctx: Context,
  targets: TargetName[],
): Promise<Record<string, Record<string, unknown>>> {
  const out: Record<string, Record<string, unknown>> = {};
  for (const name of targets) {
    out[name] = {};
    for (const store of ["memory", "postgres"] as const) {
      out[name][store] = await registerTarget(ctx, name, store);
    }
  }
  return out;
}

/**
 * `workers` (citysip, issue 5): closed-loop REGISTER/s over UDP and TCP persistent with 1 and with 2
 * worker processes, bindings in memory, and the ratio. On a 2-core box the generator shares the cores:
 * each round records its CPU and the server's.
 */
export async function scenarioWorkers(ctx: Context): Promise<Record<string, unknown>> {
  const why = availability("citysip", "memory");
  if (why) return { not_measured: why };
  const plan = ctx.plan;
  const gen = await LoadGen.start(plan.procs);
  const out: Record<string, Record<string, unknown>> = {};
  try {
    for (const workers of [1, 2]) {
      out[`workers_${workers}`] = await withTarget(
        "citysip",
        "memory",
        async (t) => {
          const modes: Record<string, unknown> = {};
          let base = 50_000_000 + workers * 5_000_000;
          for (const mode of ["udp", "tcp_persistent"] as const) {
            base += 1_000_000;
            const req = baseRequest(plan, t, mode, base);
            const { rounds, median: med } = await closedLoop(
              ctx,
              gen,
              t,
              req,
              250_000,
              `workers ${workers} ${mode} closed`,
            );
            modes[mode] = {
              goodput_per_s: med.goodput_per_s,
              rounds_per_s: rounds.map((r) => r.goodput_per_s),
              generator_cores: med.generator_cores,
              server_cores: med.cpu.server_cores,
              p99_ms: med.latency.p99_ms,
            };
          }
          return modes;
        },
        1,
        workers,
      );
    }
    const ratio: Record<string, number | null> = {};
    for (const mode of ["udp", "tcp_persistent"]) {
      const one = (out.workers_1?.[mode] as { goodput_per_s: number } | undefined)?.goodput_per_s;
      const two = (out.workers_2?.[mode] as { goodput_per_s: number } | undefined)?.goodput_per_s;
      ratio[mode] = one && two ? Math.round((two / one) * 100) / 100 : null;
    }
    return { ...out, ratio_2_to_1: ratio };
  } finally {
    await gen.stop();
  }
}

/** Capacity of a target and mode: the sustainable rate if measured, else the closed loop. */
function capacityFrom(ctx: Context, name: TargetName, mode: TransportMode): number | null {
  const reg = ctx.results.register as Record<string, Record<string, unknown>> | undefined;
  const m = reg?.[name]?.["memory"] as Record<string, ModeResult> | undefined;
  const r = m?.[mode];
  if (!r || typeof r !== "object" || !("closed" in r)) return null;
  return r.sustainable_per_s ?? r.closed.goodput_per_s;
}

/**
 * CPUs of the overload scenario: the server on one, the generators on the other. The paper drove its
 * server from other machines; on one 2-core box, sharing the cores would let the generator's own
 * work grow with the offered load and take the server's CPU away, so that 3x would measure the
 * generator. Null on a machine with fewer than 2 cores (nothing pinned).
 */
function overloadPartition(): { server: string; generator: string } | null {
  return navigator.hardwareConcurrency >= 2 ? { server: "0", generator: "1" } : null;
}

/**
 * `overload`: the server on one core (citysip with one worker, Kamailio with all its processes),
 * the load generators on the other; capacity is the closed-loop maximum measured in that same
 * setting, then open loop from 0.5x to 3x of it over UDP and TCP persistent, by our generator and
 * by SIPp.
 */
export async function scenarioOverload(
  ctx: Context,
  targets: TargetName[],
): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = {};
  const plan = ctx.plan;
  const cpus = overloadPartition();
  for (const name of targets) {
    const why = availability(name, "memory");
    if (why) {
      out[name] = { not_measured: why };
      continue;
    }
    const gen = await LoadGen.start(plan.procs);
    try {
      if (cpus) { for (const pid of gen.pids) await pinTree(pid, cpus.generator); }
      out[name] = await withTarget(
        name,
        "memory",
        async (t) => {
          const pinned = cpus ? await pinTree(t.pid, cpus.server) : false;
          const res: Record<string, unknown> = {
            partition: cpus
              ? { server_cpus: cpus.server, generator_cpus: cpus.generator, pinned }
              : null,
          };
          let base = 10_000_000;
          for (const mode of ["udp", "tcp_persistent"] as const) {
            base += 1_000_000;
            const req = baseRequest(plan, t, mode, base);
            const { rounds: closed, median } = await closedLoop(
              ctx,
              gen,
              t,
              { ...req, userBase: base + 500_000 },
              100_000,
              `overload ${name} ${mode} capacity`,
            );
            const capacity = median.goodput_per_s;
            const steps: (Round & { factor: number; goodput_ratio: number })[] = [];
            for (const f of plan.overload) {
              const rate = Math.round(capacity * f);
              const round = await measuredRun(gen, t, {
                ...req,
                loop: "open",
                rate,
                durationMs: plan.stepMs,
                maxOutstanding: Math.max(20_000, rate * 3),
              });
              const ratio = capacity > 0 ? r2(round.goodput_per_s / capacity) : 0;
              steps.push({ ...round, factor: f, goodput_ratio: ratio });
              if (round.ok === 0) {
                ctx.log(
                  `overload ${name} ${mode}: no 2xx at ${f}x, the server is not answering: stop`,
                );
                break;
              }
              ctx.log(
                `overload ${name} ${mode} ${f}x (${rate}/s): offered ${round.offered_per_s}/s, ` +
                  `503=${round.rejected_503} timeouts=${round.timeouts}, ${
                    describe(round)
                  }, ratio ${ratio}`,
              );
            }
            // The same steps through SIPp (C, another client implementation), on the generators' CPU.
            const sippSteps: Record<string, unknown>[] = [];
            if (sippAvailable() && steps.some((r) => r.ok > 0)) {
              const secs = Math.max(1, Math.round(plan.stepMs / 1000));
              for (const f of plan.overload) {
                const rate = Math.round(capacity * f);
                const meter = cpuMeter(t.pid);
                const sr = await runSipp({
                  host: t.host,
                  port: t.port,
                  transport: mode === "udp" ? "u1" : "t1",
                  calls: rate * secs,
                  limit: Math.max(200, rate * 3),
                  rate,
                  timeoutS: secs + 5,
                  ...(cpus ? { cpus: cpus.generator } : {}),
                });
                const ratio = capacity > 0 ? r2(sr.rate_per_s / capacity) : 0;
                sippSteps.push({
                  factor: f,
                  target_rate_per_s: rate,
                  ...sr,
                  goodput_ratio: ratio,
                  cpu: meter(),
                });
                ctx.log(
                  `overload ${name} ${mode} ${f}x via SIPp (${rate}/s): ${sr.rate_per_s}/s ok=${sr.ok} ` +
                    `failed=${sr.failed} sipp=${sr.sipp_cores} cores, ratio ${ratio}`,
                );
              }
            }
            res[mode] = {
              capacity_per_s: capacity,
              capacity_source: "closed loop, server and generator each on its own core",
              capacity_rounds_per_s: closed.map((r) => r.goodput_per_s),
              steps,
              sipp_steps: sippSteps,
            };
          }
          return res;
        },
        1,
        name === "citysip" ? 1 : undefined,
      );
    } catch (e) {
      out[name] = { not_measured: e instanceof Error ? e.message.split("\n")[0] : String(e) };
    } finally {
      await gen.stop();
    }
  }
  return out;
}

/** One held-flow level of the `conns` scenario. */
export interface ConnsLevel {
  /** Flows asked for in total. */
  flows_target: number;
  /** Flows held after opening. */
  flows_held: number;
  /** Flows that failed at this level. */
  failed: number;
  /** First error, if any. */
  first_error: string | null;
  /** Connection set-up (connect) latency, probed one connection at a time with N held. */
  setup: LatencySummary;
  /** First exchange (REGISTER->200 or echo) latency of the probe flows. */
  first_exchange: LatencySummary;
  /** Connect latency while opening the level in bulk (200 at once: includes our queueing). */
  bulk_setup: LatencySummary;
  /** New flows per second while opening. */
  open_rate_per_s: number;
  /** Server memory at this level. */
  server_memory: TreeMemory;
  /** Generator memory at this level. */
  generator_memory: TreeMemory;
  /** Kernel memory growth since before the first flow. */
  kernel_delta: KernelMemory;
  /** Server PSS growth per held flow, bytes. */
  user_bytes_per_flow: number | null;
  /** Kernel slab growth per socket end (both ends are on this machine), bytes. */
  kernel_bytes_per_socket_end: number | null;
  /** Latency of requests over the held flows, at a low rate. */
  refresh: Round | null;
}

async function connsSweep(
  ctx: Context,
  t: Target,
  proto: "sip" | "echo",
  levels: number[],
  octet: number,
): Promise<{ levels: ConnsLevel[]; flows_held_max: number }> {
  const plan = ctx.plan;
  const maxLevel = Math.max(...levels);
  const procs = Math.max(1, Math.ceil(maxLevel / MAX_SOCKETS_PER_WORKER));
  const gen = await LoadGen.start(procs);
  const out: ConnsLevel[] = [];
  let heldMax = 0;
  try {
    await new Promise((r) => setTimeout(r, 300));
    const k0 = kernelMemory();
    const m0 = treeMemory(t.pid);
    let held = 0;
    for (const level of levels) {
      const add = level - held;
      if (add <= 0) continue;
      // One source address per 1,000 flows (a city's clients come from many addresses, and a
      // server may limit flows per source), a fresh block per sweep (earlier sweeps' TIME_WAIT).
      const sourceAddrs = Array.from(
        { length: Math.max(procs, Math.ceil(maxLevel / 1000)) },
        (_, i) => `127.${octet}.${Math.floor(i / 250)}.${1 + (i % 250)}`,
      );
      const op = await gen.open({
        host: t.host,
        port: t.port,
        proto,
        count: add,
        concurrency: 200,
        sourceAddrs,
        userBase: 50_000_000 + held,
        timeoutMs: 10_000,
        maxFailures: Math.max(50, Math.ceil(add * 0.01)),
      });
      // Set-up latency without our own queueing: a few flows opened one at a time per worker.
      const probe = await gen.open({
        host: t.host,
        port: t.port,
        proto,
        count: plan.quick ? 20 : 200,
        concurrency: 1,
        sourceAddrs,
        userBase: 90_000_000 + held,
        timeoutMs: 10_000,
        maxFailures: 10,
      });
      held = probe.held;
      await new Promise((r) => setTimeout(r, 500));
      const mem = treeMemory(t.pid);
      const kd = kernelDelta(k0, kernelMemory());
      let refresh: Round | null = null;
      if (held > 0) {
        const meter = cpuMeter(t.pid);
        const rr = await gen.refresh({
          rate: plan.connsRefreshRate,
          durationMs: plan.quick ? 500 : 3000,
          timeoutMs: 2000,
        });
        refresh = toRound(
          {
            mode: "tcp_persistent",
            host: t.host,
            port: t.port,
            loop: "open",
            rate: plan.connsRefreshRate,
          },
          rr,
          meter(),
        );
      }
      const lvl: ConnsLevel = {
        flows_target: level,
        flows_held: held,
        failed: op.failed + probe.failed,
        first_error: op.firstError ?? probe.firstError,
        setup: Histogram.fromJSON(probe.setup).summary(),
        first_exchange: Histogram.fromJSON(probe.firstExchange).summary(),
        bulk_setup: Histogram.fromJSON(op.setup).summary(),
        open_rate_per_s: op.wallMs > 0 ? Math.round((op.opened * 1000) / op.wallMs) : 0,
        server_memory: mem,
        generator_memory: treesMemory(gen.pids),
        kernel_delta: kd,
        user_bytes_per_flow: held > 0 ? Math.round((mem.pss_bytes - m0.pss_bytes) / held) : null,
        kernel_bytes_per_socket_end: held > 0 ? Math.round(kd.slab_bytes / (2 * held)) : null,
        refresh,
      };
      out.push(lvl);
      ctx.log(
        `conns ${t.name}${
          proto === "echo" ? " (echo)" : ""
        } ${held}/${level} held (failed ${op.failed}` +
          `${op.firstError ? `: ${op.firstError}` : ""}), setup p50 ${lvl.setup.p50_ms} ms, ` +
          `user ${lvl.user_bytes_per_flow} B/flow, kernel ${lvl.kernel_bytes_per_socket_end} B/socket end, ` +
          `refresh p99 ${refresh?.latency.p99_ms ?? null} ms`,
      );
      heldMax = Math.max(heldMax, held);
      if (op.failed > 0.01 * add) break;
    }
    await gen.close();
  } finally {
    await gen.stop();
  }
  return { levels: out, flows_held_max: heldMax };
}

let connsRun = Math.floor(Math.random() * 7);

/** `conns`: hold N idle registered flows (sweep), memory per flow, latency; echo mode too. */
export async function scenarioConns(
  ctx: Context,
  targets: TargetName[],
): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = {};
  const plan = ctx.plan;
  for (const name of targets) {
    const why = availability(name, "memory");
    if (why) {
      out[name] = { not_measured: why };
      continue;
    }
    try {
      const levels = name === "kamailio" ? plan.connsKamailio : plan.connsCitysip;
      const octet = (name === "kamailio" ? 10 : 20) + (connsRun++ % 7) * 30;
      // citysip holds at most 19,000 flows per worker process (20,000 files each): enough workers.
      const workers = name === "citysip"
        ? Math.max(2, Math.ceil(Math.max(...levels) / 18_500))
        : undefined;
      out[name] = await withTarget(
        name,
        "memory",
        (t) => connsSweep(ctx, t, "sip", levels, octet),
        1,
        workers,
      );
    } catch (e) {
      out[name] = { not_measured: e instanceof Error ? e.message.split("\n")[0] : String(e) };
    }
  }
  try {
    const max = Math.max(...plan.connsEcho);
    const procs = Math.max(1, Math.ceil(max / MAX_SOCKETS_PER_WORKER));
    out["echo"] = await withTarget(
      "echo",
      "memory",
      (t) => connsSweep(ctx, t, "echo", plan.connsEcho, 30 + (connsRun++ % 7) * 30),
      procs,
    );
  } catch (e) {
    out["echo"] = { not_measured: e instanceof Error ? e.message.split("\n")[0] : String(e) };
  }
  return out;
}

/** Parses Prometheus text: `_sum` and `_count` of every series with a `stage` label. */
export function stageSeries(text: string): Map<string, number> {
  const m = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const sp = line.lastIndexOf(" ");
    const key = line.slice(0, sp).trim();
    const v = Number(line.slice(sp + 1));
    if (!key.includes("stage=") || !Number.isFinite(v)) continue;
    if (/_(sum|count)(\{|$)/.test(key) || !key.includes("_bucket")) m.set(key, v);
  }
  return m;
}

/** `stages`: per-stage queue wait and service time from the server's Prometheus endpoint. */
export async function scenarioStages(
  ctx: Context,
  targets: TargetName[],
): Promise<Record<string, unknown>> {
  if (!targets.includes("citysip")) return { not_measured: "citysip not selected", stages: null };
  const why = availability("citysip", "memory");
  if (why) return { not_measured: why, stages: null };
  const gen = await LoadGen.start(ctx.plan.procs);
  try {
    return await withTarget("citysip", "memory", async (t) => {
      if (!t.metricsUrl) return { not_measured: "no metrics endpoint", stages: null };
      const scrape = async (): Promise<Map<string, number> | null> => {
        try {
          const r = await fetch(t.metricsUrl!, { signal: AbortSignal.timeout(3000) });
          if (!r.ok) return null;
          return stageSeries(await r.text());
        } catch {
          return null;
        }
      };
      const before = await scrape();
      if (!before) return { not_measured: `no answer from ${t.metricsUrl}`, stages: null };
      const cap = capacityFrom(ctx, "citysip", "udp") ?? 2000;
      const rate = Math.round(cap * 0.5);
      const round = await measuredRun(gen, t, {
        ...baseRequest(ctx.plan, t, "udp", 30_000_000),
        loop: "open",
        rate,
        durationMs: ctx.plan.stepMs,
      });
      const after = await scrape();
      if (!after) return { not_measured: "metrics endpoint stopped answering", stages: null };
      const delta: Record<string, number> = {};
      for (const [k, v] of after) delta[k] = v - (before.get(k) ?? 0);
      // Mean per series: pair every `_sum` with its `_count`.
      const means: Record<string, number> = {};
      for (const [k, v] of Object.entries(delta)) {
        if (!/_sum(\{|$)/.test(k)) continue;
        const c = delta[k.replace(/_sum(\{|$)/, "_count$1")];
        if (c && c > 0) means[k.replace(/_sum(\{|$)/, "$1")] = v / c;
      }
      ctx.log(`stages: ${Object.keys(means).length} series at ${rate}/s`);
      return {
        rate_per_s: rate,
        round,
        mean_seconds: means,
        delta,
        stages: Object.keys(means).length ? means : null,
      };
    });
  } catch (e) {
    return {
      not_measured: e instanceof Error ? e.message.split("\n")[0] : String(e),
      stages: null,
    };
  } finally {
    await gen.stop();
  }
}

/** Sustainable REGISTER rate per summary key (`udp_memory`, ...) from register results. */
export function registerRates(reg: unknown): Record<string, number | null> {
  const keys = [
    ["udp", "memory"],
    ["udp", "postgres"],
    ["tcp_persistent", "memory"],
    ["tcp_persistent", "postgres"],
    ["tcp_with_open", "memory"],
    ["tcp_per_transaction", "memory"],
  ] as const;
  const out: Record<string, number | null> = {};
  const r = reg as Record<string, Record<string, ModeResult> | undefined> | undefined;
  for (const [mode, store] of keys) {
    const m = r?.[store]?.[mode];
    out[`${mode}_${store}`] = m && typeof m === "object" && "closed" in m
      ? m.sustainable_per_s
      : null;
  }
  return out;
}

/** `peer`: the register scenario against Kamailio (reused if already run), and ratios. */
export async function scenarioPeer(ctx: Context): Promise<Record<string, unknown>> {
  const reg = (ctx.results.register ?? {}) as Record<string, Record<string, unknown>>;
  let kam = reg["kamailio"];
  if (!kam) {
    kam = (await scenarioRegister(ctx, ["kamailio"]))["kamailio"] ?? {};
  }
  const ours = registerRates(reg["citysip"]);
  const theirs = registerRates(kam);
  const ratios: Record<string, number | null> = {};
  for (const k of Object.keys(theirs)) {
    const a = ours[k], b = theirs[k];
    ratios[k] = a != null && b != null && b > 0 ? r2(a / b) : null;
  }
  return {
    kamailio: kam,
    citysip_register_per_s: ours,
    kamailio_register_per_s: theirs,
    ratio_citysip_to_kamailio: ratios,
  };
}

/** `sipp`: the REGISTER load through SIPp, beside our generator's closed loop. */
export async function scenarioSipp(
  ctx: Context,
  targets: TargetName[],
): Promise<Record<string, unknown>> {
  if (!sippAvailable()) {
    return { not_measured: "sipp is not installed (apt-get install -y sip-tester)" };
  }
  const out: Record<string, unknown> = {};
  const plan = ctx.plan;
  for (const name of targets) {
    const why = availability(name, "memory");
    if (why) {
      out[name] = { not_measured: why };
      continue;
    }
    try {
      out[name] = await withTarget(name, "memory", async (t) => {
        const res: Record<string, unknown> = {};
        const runs: [string, "u1" | "t1" | "tn", TransportMode, number][] = [
          ["udp", "u1", "udp", plan.sippCalls],
          ["tcp_persistent", "t1", "tcp_persistent", plan.sippCalls],
          ["tcp_per_transaction", "tn", "tcp_per_transaction", Math.round(plan.sippCalls / 5)],
        ];
        const gen = await LoadGen.start(plan.procs);
        try {
          for (const [label, tr, mode, calls] of runs) {
            const meter = cpuMeter(t.pid);
            const s: SippResult = await runSipp({
              host: t.host,
              port: t.port,
              transport: tr,
              calls,
              limit: plan.outstanding,
              rate: 100_000,
              timeoutS: plan.quick ? 10 : 60,
            });
            const cpu = meter();
            const ours = await measuredRun(gen, t, {
              ...baseRequest(plan, t, mode, 40_000_000),
              loop: "closed",
              outstanding: plan.outstanding,
              durationMs: plan.closedMs,
              connections: tr === "t1" ? plan.procs : plan.tcpConnections,
            });
            ctx.log(
              `sipp ${name} ${label}: sipp ${s.rate_per_s}/s (ok ${s.ok}, failed ${s.failed}, ` +
                `sipp ${s.sipp_cores} cores, server ${cpu.server_cores}); ours ${describe(ours)}`,
            );
            res[label] = {
              sipp: { ...s, cpu },
              ours_closed: ours,
              ratio_ours_to_sipp: s.rate_per_s > 0 ? r2(ours.goodput_per_s / s.rate_per_s) : null,
            };
          }
        } finally {
          await gen.stop();
        }
        return res;
      });
    } catch (e) {
      out[name] = { not_measured: e instanceof Error ? e.message.split("\n")[0] : String(e) };
    }
  }
  return out;
}
