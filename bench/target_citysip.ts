/**
 * citysip as the server under test, started by the bench as a subprocess. The command line
 * is built in one place, {@linkcode citysipCommand}, so flags can follow the server.
 *
 * @module
 */

import { freePort, onCleanup, probeSip, recreateDatabase, stopTree } from "./target.ts";
import type { StoreMode, Target } from "./target.ts";

const REPO = new URL("../", import.meta.url).pathname;

/** Options of {@linkcode startCitysip}. */
export interface CitysipOptions {
  /** Bindings in memory or in PostgreSQL. */
  store: StoreMode;
  /** Port for UDP and TCP; a free one from 5170 when left out. */
  port?: number;
  /** Worker processes (`--workers`); the server's default when left out. */
  workers?: number;
  /** Port of the Prometheus endpoint (`--metrics`); a free one when left out. */
  metricsPort?: number;
  /** Database for the PostgreSQL mode. @default "citysip_bench" */
  database?: string;
  /** How long to wait for the first answer, ms. @default 30000 */
  startTimeoutMs?: number;
}

/** Everything {@linkcode citysipCommand} needs, with ports chosen. */
export interface CitysipCommandOptions {
  /** SIP port (UDP and TCP). */
  port: number;
  /** Storage mode. */
  store: StoreMode;
  /** PostgreSQL URL for the `postgres` store. */
  dbUrl: string;
  /** Worker processes, if set. */
  workers?: number;
  /** Metrics port, if set. */
  metricsPort?: number;
}

/**
 * The command line that starts citysip (program and arguments). Environment variable
 * `CITYSIP_BENCH_EXTRA` (space-separated) appends flags without editing the bench.
 */
export function citysipCommand(o: CitysipCommandOptions): string[] {
  const cmd = [
    Deno.execPath(),
    "run",
    "-A",
    "--unstable-net",
    `${REPO}main.ts`,
    "serve",
    "--listen",
    `udp:127.0.0.1:${o.port}`,
    "--listen",
    `tcp:127.0.0.1:${o.port}`,
    // The load generator is one source address: per-source limits would measure themselves.
    "--register-rate",
    "0",
    "--connect-rate",
    "0",
    // Held flows come from a few hundred loopback addresses.
    "--max-flows-per-ip",
    "1000000",
  ];
  if (o.store === "memory") cmd.push("--store", "memory");
  else cmd.push("--db", o.dbUrl);
  if (o.workers !== undefined) cmd.push("--workers", String(o.workers));
  if (o.metricsPort !== undefined) cmd.push("--metrics", `127.0.0.1:${o.metricsPort}`);
  const extra = Deno.env.get("CITYSIP_BENCH_EXTRA");
  if (extra) cmd.push(...extra.split(" ").filter((s) => s));
  return cmd;
}

/** Whether citysip can be started at all (its `main.ts` exists). */
export function citysipAvailable(): { ok: boolean; reason: string } {
  try {
    Deno.statSync(`${REPO}main.ts`);
  } catch {
    return { ok: false, reason: "main.ts does not exist yet" };
  }
  return { ok: true, reason: "" };
}

/** Starts citysip and waits until it answers OPTIONS (any SIP response). */
export async function startCitysip(opts: CitysipOptions): Promise<Target> {
  const avail = citysipAvailable();
  if (!avail.ok) throw new Error(`Cannot start citysip: ${avail.reason}`);
  const port = opts.port ?? await freePort(5170);
  const metricsPort = opts.metricsPort ?? await freePort(9170);
  const database = opts.database ?? "citysip_bench";
  if (opts.store === "postgres") await recreateDatabase(database);
  const dir = await Deno.makeTempDir({ prefix: "citysip-bench-server-" });
  const logPath = `${dir}/citysip-${port}.log`;
  const cmdOpts: CitysipCommandOptions = {
    port,
    store: opts.store,
    dbUrl: `postgres://postgres@127.0.0.1:5432/${database}`,
    metricsPort,
  };
  if (opts.workers !== undefined) cmdOpts.workers = opts.workers;
  const [program, ...args] = citysipCommand(cmdOpts);
  const quoted = [program!, ...args].map((a) => `'${a.replaceAll("'", `'\\''`)}'`).join(" ");
  const child = new Deno.Command("sh", {
    args: ["-c", `cd '${REPO}' && exec ${quoted} >'${logPath}' 2>&1`],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  const pid = child.pid;
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    unregister();
    await stopTree(pid);
    await child.status;
  };
  const unregister = onCleanup(stop);
  const status = await Promise.race([
    probeSip("127.0.0.1", port, opts.startTimeoutMs ?? 30000),
    child.status.then(() => -1),
  ]);
  if (status <= 0) {
    await stop();
    let log = "";
    try {
      log = Deno.readTextFileSync(logPath).slice(-2000);
    } catch { /* no log */ }
    throw new Error(
      `Cannot start citysip on port ${port}: ${status < 0 ? "it exited" : "no answer"}\n${log}`,
    );
  }
  return {
    name: "citysip",
    store: opts.store,
    host: "127.0.0.1",
    port,
    pid,
    metricsUrl: `http://127.0.0.1:${metricsPort}/metrics`,
    logPath,
    stop,
  };
}
