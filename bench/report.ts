/**
 * Turns a run's results into the summary file (the keys issue 7 lists), a markdown table
 * with the paper's figures beside ours, and SVG plots.
 *
 * @module
 */

import { lineChart } from "./plot.ts";
import type { Series } from "./plot.ts";
import type { MachineFacts } from "./measure.ts";
import { registerRates } from "./scenarios.ts";
import type { ConnsLevel, ModeResult, Round } from "./scenarios.ts";

/** The paper's figures ("One Server Per City", Ono and Schulzrinne, 2008), for the table. */
export const PAPER = {
  echo_flows_held: "420,000-520,000",
  kernel_bytes_per_flow: 2300,
  connection_setup_ms: 0.2,
  register_per_s: {
    udp_memory: 5300,
    tcp_persistent_memory: 4100,
    tcp_with_open_memory: 3300,
    tcp_per_transaction_memory: 2900,
  } as Record<string, number>,
  overload_goodput_ratio_at_3x: { udp: "0.72-0.90", tcp: "0.17" },
};

/** Register-rate keys of the summary, in table order. */
export const RATE_KEYS = [
  "udp_memory",
  "udp_postgres",
  "tcp_persistent_memory",
  "tcp_persistent_postgres",
  "tcp_with_open_memory",
  "tcp_per_transaction_memory",
] as const;

/** `summary.json`: exactly the keys issue 7 lists; null where not measured. */
export interface Summary {
  /** Most idle registered flows citysip held. */
  flows_held_max: number | null;
  /** Kernel slab growth per held flow, bytes (per socket end: the server's share on loopback). */
  kernel_bytes_per_flow: number | null;
  /** citysip user memory (PSS) growth per held flow, bytes. */
  user_bytes_per_flow: number | null;
  /** citysip sustainable REGISTER/s per mode. */
  register_per_s: Record<typeof RATE_KEYS[number], number | null>;
  /** Kamailio sustainable REGISTER/s per mode. */
  kamailio_register_per_s: Record<typeof RATE_KEYS[number], number | null>;
  /** citysip goodput at 3x capacity divided by capacity. */
  overload_goodput_ratio_at_3x: { udp: number | null; tcp: number | null };
  /** citysip REGISTER/s of one worker on one core (the overload scenario's closed-loop capacity). */
  capacity_one_worker_per_s: { udp: number | null; tcp: number | null };
  /** citysip p99 at 80% of capacity, ms. */
  p99_ms_at_80pct: { udp_postgres: number | null; tcp_persistent_postgres: number | null };
  /** Machine facts. */
  machine: { cpu_model: string; cores: number; kernel: string; deno: string };
}

type Results = Record<string, unknown>;

function get(o: unknown, ...path: string[]): unknown {
  let cur = o;
  for (const k of path) {
    if (cur === null || typeof cur !== "object") return undefined;
    cur = (cur as Record<string, unknown>)[k];
  }
  return cur;
}

function rates(results: Results, target: string): Record<typeof RATE_KEYS[number], number | null> {
  const reg = get(results, "register", target) ?? get(results, "peer", target);
  const r = registerRates(reg);
  const out = {} as Record<typeof RATE_KEYS[number], number | null>;
  for (const k of RATE_KEYS) out[k] = r[k] ?? null;
  return out;
}

interface ConnsOut {
  levels: ConnsLevel[];
  flows_held_max: number;
}

function conns(results: Results, target: string): ConnsOut | null {
  const c = get(results, "conns", target);
  return c && typeof c === "object" && "levels" in c ? c as ConnsOut : null;
}

function lastLevel(c: ConnsOut | null): ConnsLevel | null {
  if (!c) return null;
  for (let i = c.levels.length - 1; i >= 0; i--) {
    const l = c.levels[i]!;
    if (l.flows_held > 0) return l;
  }
  return null;
}

/**
 * Goodput/capacity at 3x: from our generator's round, unless that round was generator-limited
 * and SIPp's round at 3x exists (then SIPp's, which offers more load per core).
 */
export function overloadRatio(results: Results, target: string, mode: string): number | null {
  const steps = get(results, "overload", target, mode, "steps") as
    | (Round & { factor: number; goodput_ratio: number })[]
    | undefined;
  if (!Array.isArray(steps)) return null;
  const s = steps.find((x) => Math.abs(x.factor - 3) < 1e-9);
  const sipp = (get(results, "overload", target, mode, "sipp_steps") as
    | { factor: number; goodput_ratio: number; ok: number }[]
    | undefined)?.find((x) => Math.abs(x.factor - 3) < 1e-9);
  if (s && s.generator_limited && sipp && sipp.ok > 0) return sipp.goodput_ratio;
  return s ? s.goodput_ratio : null;
}

/** The overload scenario's capacity: closed-loop REGISTER/s of one worker pinned to one core. */
export function overloadCapacity(results: Results, target: string, mode: string): number | null {
  const c = get(results, "overload", target, mode, "capacity_per_s");
  return typeof c === "number" ? c : null;
}

/** p99 latency (ms) of the requests admitted (answered 2xx) in our generator's 3x round. */
export function overloadP99(results: Results, target: string, mode: string): number | null {
  const steps = get(results, "overload", target, mode, "steps") as
    | (Round & { factor: number })[]
    | undefined;
  if (!Array.isArray(steps)) return null;
  return steps.find((x) => Math.abs(x.factor - 3) < 1e-9)?.latency.p99_ms ?? null;
}

function p80(results: Results, target: string, store: string, mode: string): number | null {
  const m = get(results, "register", target, store, mode) as ModeResult | undefined;
  return m && typeof m === "object" && "closed" in m ? m.p99_ms_at_80pct : null;
}

/** Builds the summary from a run's scenario results. */
export function buildSummary(results: Results, machine: MachineFacts): Summary {
  const c = conns(results, "citysip");
  const last = lastLevel(c);
  return {
    flows_held_max: c ? c.flows_held_max : null,
    kernel_bytes_per_flow: last?.kernel_bytes_per_socket_end ?? null,
    user_bytes_per_flow: last?.user_bytes_per_flow ?? null,
    register_per_s: rates(results, "citysip"),
    kamailio_register_per_s: rates(results, "kamailio"),
    overload_goodput_ratio_at_3x: {
      udp: overloadRatio(results, "citysip", "udp"),
      tcp: overloadRatio(results, "citysip", "tcp_persistent"),
    },
    capacity_one_worker_per_s: {
      udp: overloadCapacity(results, "citysip", "udp"),
      tcp: overloadCapacity(results, "citysip", "tcp_persistent"),
    },
    p99_ms_at_80pct: {
      udp_postgres: p80(results, "citysip", "postgres", "udp"),
      tcp_persistent_postgres: p80(results, "citysip", "postgres", "tcp_persistent"),
    },
    machine: {
      cpu_model: machine.cpu_model,
      cores: machine.cores,
      kernel: machine.kernel,
      deno: machine.deno,
    },
  };
}

const n = (v: unknown): string =>
  typeof v === "number" && Number.isFinite(v) ? v.toLocaleString("en-US") : "n/m";

/** The markdown table printed at the end of a run. */
export function markdown(results: Results, summary: Summary): string {
  const lines: string[] = [];
  const ratio = (a: number | null, b: number | null): string =>
    a !== null && b !== null && b > 0 ? (a / b).toFixed(2) : "n/m";
  lines.push("| figure | paper (2008) | citysip | Kamailio | citysip/Kamailio |");
  lines.push("|---|---|---|---|---|");
  for (const k of RATE_KEYS) {
    const a = summary.register_per_s[k], b = summary.kamailio_register_per_s[k];
    lines.push(
      `| REGISTER/s sustainable, ${k} | ${n(PAPER.register_per_s[k])} | ${n(a)} | ${n(b)} | ${
        ratio(a, b)
      } |`,
    );
  }
  for (const [label, mode] of [["UDP", "udp"], ["TCP", "tcp_persistent"]] as const) {
    const key = mode === "udp" ? "udp" : "tcp";
    lines.push(
      `| goodput/capacity at 3x, ${label} | ${PAPER.overload_goodput_ratio_at_3x[key]} | ${
        n(overloadRatio(results, "citysip", mode))
      } | ${n(overloadRatio(results, "kamailio", mode))} | |`,
    );
    lines.push(
      `| p99 ms of admitted at 3x, ${label} | | ${n(overloadP99(results, "citysip", mode))} | ${
        n(overloadP99(results, "kamailio", mode))
      } | |`,
    );
  }
  const kc = lastLevel(conns(results, "kamailio"));
  const ec = conns(results, "echo");
  const el = lastLevel(ec);
  const cc = lastLevel(conns(results, "citysip"));
  lines.push(
    `| idle flows held (max) | ${PAPER.echo_flows_held} (echo) | ${n(summary.flows_held_max)} | ${
      n(conns(results, "kamailio")?.flows_held_max)
    } | |`,
  );
  lines.push(
    `| echo server: flows held | ${PAPER.echo_flows_held} | echo (ours): ${
      n(ec?.flows_held_max)
    } | | |`,
  );
  lines.push(
    `| kernel bytes per socket end | ${n(PAPER.kernel_bytes_per_flow)} | ${
      n(summary.kernel_bytes_per_flow)
    } | ${n(kc?.kernel_bytes_per_socket_end)} | echo: ${n(el?.kernel_bytes_per_socket_end)} |`,
  );
  lines.push(
    `| user bytes per flow (PSS) | | ${n(summary.user_bytes_per_flow)} | ${
      n(kc?.user_bytes_per_flow)
    } | echo: ${n(el?.user_bytes_per_flow)} |`,
  );
  lines.push(
    `| connection set-up p50, ms | ${PAPER.connection_setup_ms} | ${n(cc?.setup.p50_ms)} | ${
      n(kc?.setup.p50_ms)
    } | echo: ${n(el?.setup.p50_ms)} |`,
  );
  lines.push(
    `| p99 ms at 80%, UDP / TCP persistent, PostgreSQL | | ${
      n(summary.p99_ms_at_80pct.udp_postgres)
    } / ${n(summary.p99_ms_at_80pct.tcp_persistent_postgres)} | ${
      n(p80(results, "kamailio", "postgres", "udp"))
    } / ${n(p80(results, "kamailio", "postgres", "tcp_persistent"))} | |`,
  );
  // Closed loop per target, with CPU, to show who was busy.
  lines.push("");
  lines.push(
    "| target | store | mode | closed-loop max /s | p50 ms | p99 ms | generator cores | server cores | machine busy cores |",
  );
  lines.push("|---|---|---|---|---|---|---|---|---|");
  for (const t of ["citysip", "kamailio"]) {
    for (const store of ["memory", "postgres"]) {
      const modes = get(results, "register", t, store) ??
        (t === "kamailio" ? get(results, "peer", "kamailio", store) : undefined);
      if (!modes || typeof modes !== "object") continue;
      if ("not_measured" in modes) {
        lines.push(
          `| ${t} | ${store} | all | not measured: ${
            (modes as { not_measured: string }).not_measured
          } | | | | | |`,
        );
        continue;
      }
      for (const [mode, m] of Object.entries(modes as Record<string, ModeResult>)) {
        const c = m.closed;
        lines.push(
          `| ${t} | ${store} | ${mode} | ${n(c.goodput_per_s)} | ${n(c.latency.p50_ms)} | ${
            n(c.latency.p99_ms)
          } | ${n(c.generator_cores)} | ${n(c.cpu.server_cores)} | ${
            n(c.cpu.machine_busy_cores)
          } |`,
        );
      }
    }
  }
  const sipp = get(results, "sipp");
  if (sipp && typeof sipp === "object") {
    lines.push("");
    lines.push(
      "| SIPp vs our generator (closed loop, same server) | SIPp /s | SIPp cores | ours /s | our cores | ours/SIPp |",
    );
    lines.push("|---|---|---|---|---|---|");
    for (const [t, v] of Object.entries(sipp as Record<string, unknown>)) {
      if (!v || typeof v !== "object" || "not_measured" in v) continue;
      for (const [mode, r] of Object.entries(v as Record<string, Record<string, unknown>>)) {
        const s = r["sipp"] as { rate_per_s: number; sipp_cores: number | null };
        const o = r["ours_closed"] as Round;
        lines.push(
          `| ${t} ${mode} | ${n(s.rate_per_s)} | ${n(s.sipp_cores)} | ${n(o.goodput_per_s)} | ${
            n(o.generator_cores)
          } | ${n(r["ratio_ours_to_sipp"])} |`,
        );
      }
    }
  }
  const st = get(results, "stages");
  if (st && typeof st === "object") {
    const means = (st as { stages: Record<string, number> | null }).stages;
    lines.push("");
    if (means) {
      lines.push("| stage series | mean ms |");
      lines.push("|---|---|");
      for (const [k, v] of Object.entries(means)) lines.push(`| ${k} | ${(v * 1000).toFixed(3)} |`);
    } else {
      lines.push(
        `stages: not measured (${(st as { not_measured?: string }).not_measured ?? "no data"})`,
      );
    }
  }
  lines.push("");
  lines.push(
    "n/m = not measured. Rates: highest open-loop rate with >= 99.9% success and p99 under the bound.",
  );
  return lines.join("\n");
}

/** SVG plots of a run: file name -> SVG text. */
export function plots(results: Results): Record<string, string> {
  const out: Record<string, string> = {};
  const mem: Series[] = [];
  for (const t of ["citysip", "kamailio", "echo"]) {
    const c = conns(results, t);
    if (!c || c.levels.length === 0) continue;
    mem.push({
      name: `${t} user (PSS)`,
      points: c.levels.map((l) => [l.flows_held, l.server_memory.pss_bytes / 2 ** 20]),
    });
    mem.push({
      name: `${t} kernel slab`,
      points: c.levels.map((l) => [l.flows_held, l.kernel_delta.slab_bytes / 2 ** 20]),
    });
  }
  out["memory_vs_connections.svg"] = lineChart({
    title: "Memory vs idle registered connections",
    xLabel: "connections held",
    yLabel: "MiB",
    series: mem,
  });
  const lat: Series[] = [];
  const good: Series[] = [];
  for (const t of ["citysip", "kamailio"]) {
    const modes = get(results, "register", t, "memory") ??
      (t === "kamailio" ? get(results, "peer", "kamailio", "memory") : undefined);
    if (modes && typeof modes === "object" && !("not_measured" in modes)) {
      for (const [mode, m] of Object.entries(modes as Record<string, ModeResult>)) {
        lat.push({
          name: `${t} ${mode}`,
          points: m.sweep.map((
            r,
          ) => [r.target_rate_per_s ?? r.offered_per_s, r.latency.p99_ms ?? NaN]),
        });
      }
    }
    for (const mode of ["udp", "tcp_persistent"]) {
      const steps = get(results, "overload", t, mode, "steps") as Round[] | undefined;
      if (Array.isArray(steps)) {
        good.push({
          name: `${t} ${mode}`,
          points: steps.map((r) => [r.target_rate_per_s ?? r.offered_per_s, r.goodput_per_s]),
        });
      }
      const sipp = get(results, "overload", t, mode, "sipp_steps") as
        | { target_rate_per_s: number; rate_per_s: number }[]
        | undefined;
      if (Array.isArray(sipp) && sipp.length) {
        good.push({
          name: `${t} ${mode} (SIPp)`,
          points: sipp.map((r) => [r.target_rate_per_s, r.rate_per_s]),
        });
      }
    }
  }
  out["response_time_vs_rate.svg"] = lineChart({
    title: "REGISTER p99 response time vs offered rate",
    xLabel: "offered REGISTER/s",
    yLabel: "p99 ms",
    series: lat,
    logY: true,
  });
  out["goodput_vs_offered.svg"] = lineChart({
    title: "Goodput vs offered load (overload)",
    xLabel: "offered REGISTER/s",
    yLabel: "200 OK/s",
    series: good,
  });
  return out;
}
