/**
 * citysip's fuzzer.
 *
 * ```
 * deno run -A fuzz/main.ts [--mode parser|network] [--seconds N] [--seed S]
 *   [--target udp:127.0.0.1:P,tcp:127.0.0.1:P] [--no-save]
 * ```
 *
 * - parser mode mutates the corpus and runs every input through the `sip/` entry points (see
 *   `fuzz/check.ts`); failing inputs go to `tests/fixtures/fuzz/crashes/`.
 * - network mode sends mutated messages to a running server (or one it starts when no `--target` is
 *   given) over UDP and TCP, and after each batch checks that a valid REGISTER still gets 200.
 *
 * Exits 1 when anything failed, 2 on a bad flag.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { fuzzNetwork, parseTargets, type Targets } from "./network.ts";
import { fuzzParser } from "./parser.ts";
import { startServer } from "./server.ts";

function usage(message: string): never {
  console.error(`fuzz: Cannot start: ${message}`);
  Deno.exit(2);
}

async function run(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      mode: { type: "string", default: "parser" },
      seconds: { type: "string", default: "10" },
      seed: { type: "string" },
      target: { type: "string" },
      "no-save": { type: "boolean", default: false },
    },
  });
  const seconds = Number(values.seconds);
  if (!(seconds > 0)) usage(`invalid --seconds "${values.seconds}"`);
  const seed = values.seed === undefined ? Date.now() >>> 0 : Number(values.seed);
  if (!Number.isInteger(seed)) usage(`invalid --seed "${values.seed}"`);
  const save = !values["no-save"];

  if (values.mode === "parser") {
    console.log(`fuzz parser: seed=${seed} seconds=${seconds}`);
    const stats = fuzzParser({
      seed,
      seconds,
      save,
      progress: (s) =>
        console.log(
          `  ${s.inputs} inputs, ${(s.inputs / s.seconds).toFixed(0)}/s, ` +
            `${s.failures.size} failure kinds, rss ${s.rssMaxMiB.toFixed(0)} MiB`,
        ),
    });
    const crashes = [...stats.failures].filter(([k]) => k !== "slow" && k !== "memory");
    const hangs = stats.failures.get("slow")?.count ?? 0;
    console.log(
      `fuzz parser: seed=${seed} inputs=${stats.inputs} seconds=${stats.seconds.toFixed(1)} ` +
        `rate=${(stats.inputs / stats.seconds).toFixed(0)}/s crashes=${
          crashes.reduce((n, [, v]) => n + v.count, 0)
        } hangs=${hangs} slowest_ms=${stats.slowestMs.toFixed(1)} ` +
        `rss_start_mib=${stats.rssStartMiB.toFixed(0)} rss_max_mib=${stats.rssMaxMiB.toFixed(0)}`,
    );
    for (const [kind, f] of stats.failures) {
      console.log(`  FAIL ${kind} x${f.count}${f.file ? ` -> crashes/${f.file}.bin` : ""}`);
      console.log(`    ${f.detail.split("\n").slice(0, 3).join("\n    ")}`);
    }
    return stats.failures.size === 0 ? 0 : 1;
  }
  if (values.mode === "network") {
    let given: Targets | null = null;
    if (values.target !== undefined) {
      try {
        given = parseTargets(values.target);
      } catch (error) {
        usage(`invalid --target "${values.target}": ${(error as Error).message}`);
      }
    }
    const server = given === null ? await startServer() : null;
    try {
      const targets = given ?? server!.targets;
      console.log(
        `fuzz network: seed=${seed} seconds=${seconds} udp=${targets.udp ?? "-"} tcp=${
          targets.tcp ?? "-"
        }`,
      );
      const stats = await fuzzNetwork({ seed, seconds, targets, save });
      console.log(
        `fuzz network: sent=${stats.sent} (udp ${stats.udpSent}, tcp ${stats.tcpSent}) ` +
          `replies=${stats.replies} batches=${stats.batches} checks_ok=${stats.checksOk} ` +
          `checks_failed=${stats.checksFailed} rate=${(stats.sent / stats.seconds).toFixed(0)}/s`,
      );
      for (const f of stats.failures) console.log(`  FAIL ${f}`);
      return stats.checksFailed === 0 ? 0 : 1;
    } finally {
      await server?.stop();
    }
  }
  usage(`invalid --mode "${values.mode}": expected parser or network`);
}

if (import.meta.main) Deno.exit(await run(Deno.args));
