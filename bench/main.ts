/**
 * `deno task bench`: reproduces the measurements of "One Server Per City" (Ono and
 * Schulzrinne) against citysip and, in the same run, Kamailio.
 *
 * ```
 * deno task bench [--quick] [--scenario NAME]... [--target citysip|kamailio|both] [--out DIR]
 *                 [--procs N]
 * ```
 *
 * Scenarios: register, overload, conns, stages, peer, sipp (all when none is named).
 * Writes `<out>/<timestamp>.json` (machine facts, flags, commit, every figure, raw rounds),
 * `<out>/summary.json` (full runs; `summary.quick.json` for `--quick`), SVG plots, and
 * prints a markdown table. Default out: `bench/results` (full), `bench/results/quick`
 * (quick; ignored by git).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { cpuMeter, machineFacts } from "./measure.ts";
import { buildSummary, markdown, plots } from "./report.ts";
import {
  availability,
  makePlan,
  scenarioConns,
  scenarioOverload,
  scenarioPeer,
  scenarioRegister,
  SCENARIOS,
  scenarioSipp,
  scenarioStages,
  scenarioWorkers,
} from "./scenarios.ts";
import type { Context, ScenarioName, TargetName } from "./scenarios.ts";
import { runCleanups } from "./target.ts";
import { citysipCommand } from "./target_citysip.ts";

/** Parsed command line of the bench. */
export interface BenchFlags {
  /** Smoke pass of every scenario (about 2 minutes). */
  quick: boolean;
  /** Scenarios to run, in canonical order. */
  scenarios: ScenarioName[];
  /** Servers to measure. */
  targets: TargetName[];
  /** Output directory. */
  out: string;
  /** Load-generator processes for REGISTER loads. */
  procs: number;
}

const HERE = new URL(".", import.meta.url).pathname;

/** Parses and validates the command line; throws `RangeError` naming the bad flag. */
export function parseFlags(argv: string[]): BenchFlags {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: "boolean", default: false },
      scenario: { type: "string", multiple: true },
      target: { type: "string", default: "both" },
      out: { type: "string" },
      procs: { type: "string", default: "2" },
      help: { type: "boolean", default: false },
    },
    allowPositionals: false,
  });
  if (values.help) {
    console.log(
      "deno task bench [--quick] [--scenario NAME]... [--target citysip|kamailio|both] [--out DIR] [--procs N]\n" +
        `scenarios: ${SCENARIOS.join(", ")}`,
    );
    Deno.exit(0);
  }
  const names = values.scenario ?? [...SCENARIOS];
  for (const s of names) {
    if (!(SCENARIOS as readonly string[]).includes(s)) {
      throw new RangeError(
        `Cannot run: invalid --scenario "${s}" (one of ${SCENARIOS.join(", ")})`,
      );
    }
  }
  const t = values.target;
  if (t !== "citysip" && t !== "kamailio" && t !== "both") {
    throw new RangeError(`Cannot run: invalid --target "${t}" (citysip, kamailio or both)`);
  }
  const procs = Number(values.procs);
  if (!Number.isInteger(procs) || procs < 1 || procs > 64) {
    throw new RangeError(`Cannot run: invalid --procs "${values.procs}"`);
  }
  return {
    quick: values.quick,
    scenarios: SCENARIOS.filter((s) => names.includes(s)),
    targets: t === "both" ? ["citysip", "kamailio"] : [t],
    out: values.out ?? (values.quick ? `${HERE}results/quick` : `${HERE}results`),
    procs,
  };
}

async function gitCommit(): Promise<{ hash: string | null; dirty: boolean | null }> {
  const run = async (args: string[]): Promise<string | null> => {
    try {
      const o = await new Deno.Command("git", { args, cwd: HERE, stdout: "piped", stderr: "null" })
        .output();
      return o.success ? new TextDecoder().decode(o.stdout).trim() : null;
    } catch {
      return null;
    }
  };
  const hash = await run(["rev-parse", "HEAD"]);
  const status = await run(["status", "--porcelain"]);
  return { hash, dirty: status === null ? null : status.length > 0 };
}

/** Runs the bench with `flags`; returns the path of the result file. */
export async function runBench(flags: BenchFlags): Promise<string> {
  const t0 = performance.now();
  const started = new Date();
  const log = (msg: string): void => {
    console.error(`[bench ${((performance.now() - t0) / 1000).toFixed(1)}s] ${msg}`);
  };
  const plan = makePlan(flags.quick, flags.procs);
  const unavailable: Partial<Record<TargetName, string>> = {};
  for (const t of flags.targets) {
    const why = availability(t, "memory");
    if (why) {
      unavailable[t] = why;
      log(`${t}: not available (${why})`);
    }
  }
  const ctx: Context = { plan, targets: flags.targets, unavailable, log, results: {} };
  const machine = await machineFacts();
  await Deno.mkdir(flags.out, { recursive: true });
  const stamp = started.toISOString().replace(/[:.]/g, "-");
  const file = `${flags.out}/${stamp}.json`;
  // Other work on the box skews every figure: measure it before starting, and say so.
  const idle = cpuMeter(null);
  await new Promise((r) => setTimeout(r, 1000));
  const busyBefore = idle().machine_busy_cores;
  if (busyBefore > 0.3) {
    log(`warning: the machine was already busy (${busyBefore} cores) before the bench started`);
  }
  const timings: Record<string, number> = {};
  for (const s of flags.scenarios) {
    const s0 = performance.now();
    log(`scenario ${s}`);
    try {
      switch (s) {
        case "register":
          ctx.results.register = await scenarioRegister(ctx, flags.targets);
          break;
        case "workers":
          ctx.results.workers = flags.targets.includes("citysip")
            ? await scenarioWorkers(ctx)
            : { not_measured: "citysip is not a target" };
          break;
        case "overload":
          ctx.results.overload = await scenarioOverload(ctx, flags.targets);
          break;
        case "conns":
          ctx.results.conns = await scenarioConns(ctx, flags.targets);
          break;
        case "stages":
          ctx.results.stages = await scenarioStages(ctx, flags.targets);
          break;
        case "peer":
          ctx.results.peer = await scenarioPeer(ctx);
          break;
        case "sipp":
          ctx.results.sipp = await scenarioSipp(ctx, flags.targets);
          break;
      }
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      log(`scenario ${s} failed: ${msg}`);
      ctx.results[s] = { not_measured: `failed: ${msg.split("\n")[0]}` };
    }
    timings[s] = Math.round((performance.now() - s0) / 100) / 10;
    // Partial results after every scenario: an interrupted run still leaves its data.
    await Deno.writeTextFile(
      file,
      JSON.stringify({
        partial: true,
        started: started.toISOString(),
        flags,
        results: ctx.results,
      }) +
        "\n",
    );
  }
  const summary = buildSummary(ctx.results, machine);
  const doc = {
    version: 1,
    started: started.toISOString(),
    finished: new Date().toISOString(),
    duration_s: Math.round((performance.now() - t0) / 100) / 10,
    scenario_duration_s: timings,
    flags,
    plan,
    commit: await gitCommit(),
    machine,
    machine_busy_before_cores: busyBefore,
    targets: Object.fromEntries(flags.targets.map((t) => [t, {
      available: !unavailable[t],
      reason: unavailable[t] ?? null,
      command: t === "citysip"
        ? citysipCommand({ port: 0, store: "memory", dbUrl: "postgres://...", metricsPort: 0 })
          .join(" ")
        : "kamailio -f registrar.cfg -m 4096 -M 64 -E -DD -P PIDFILE -A PORT=N [-A WITH_DB]",
    }])),
    units: {
      "*_per_s": "requests (or flows) per second",
      "*_ms": "milliseconds",
      "*_bytes": "bytes",
      "*_cores": "CPU cores busy (1 = one core for the whole interval)",
      "latency.*": "milliseconds; raw histograms in microseconds (log buckets, 64 per octave)",
      "kernel_bytes_per_flow": "slab growth / (2 x flows): both socket ends live on this machine",
      "user_bytes_per_flow": "growth of the server tree's PSS / flows",
    },
    summary,
    results: ctx.results,
  };
  await Deno.writeTextFile(file, JSON.stringify(doc, null, 1) + "\n");
  const summaryFile = `${flags.out}/${flags.quick ? "summary.quick.json" : "summary.json"}`;
  await Deno.writeTextFile(summaryFile, JSON.stringify(summary, null, 2) + "\n");
  const prefix = flags.quick ? "quick-" : "";
  for (const [name, svg] of Object.entries(plots(ctx.results))) {
    await Deno.writeTextFile(`${flags.out}/${prefix}${name}`, svg);
  }
  console.log(markdown(ctx.results, summary));
  log(`wrote ${file} and ${summaryFile} in ${doc.duration_s} s`);
  return file;
}

if (import.meta.main) {
  let flags: BenchFlags;
  try {
    flags = parseFlags(Deno.args);
  } catch (e) {
    console.error(e instanceof Error ? e.message : String(e));
    Deno.exit(2);
  }
  const onSignal = async (): Promise<void> => {
    console.error("[bench] interrupted: stopping servers");
    await runCleanups();
    Deno.exit(130);
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  try {
    await runBench(flags);
  } finally {
    await runCleanups();
  }
  Deno.exit(0);
}
