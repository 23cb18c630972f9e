/**
 * Kamailio as the peer registrar: started from `/work/shared/peers/kamailio/registrar.cfg`
 * (override with env `KAMAILIO_CFG`), bindings in memory or written through to PostgreSQL,
 * and always stopped afterwards.
 *
 * @example
 * ```ts
 * await withKamailio({ store: "memory" }, async (t) => {
 *   console.log("Kamailio answers on", t.port);
 * });
 * ```
 *
 * @module
 */

import { freePort, onCleanup, probeSip, psql, recreateDatabase, stopTree } from "./target.ts";
import type { StoreMode, Target } from "./target.ts";

/** Default configuration file of the peer. */
export const KAMAILIO_CFG: string = Deno.env.get("KAMAILIO_CFG") ??
  new URL("../../shared/peers/kamailio/registrar.cfg", import.meta.url).pathname;

const SQL_DIR = "/usr/share/kamailio/postgres";

/** Options of {@linkcode startKamailio}. */
export interface KamailioOptions {
  /** Bindings in memory, or written through to PostgreSQL (usrloc db_mode 1). */
  store: StoreMode;
  /** Port for UDP and TCP; a free one from 5070 when left out. */
  port?: number;
  /** Shared memory, MB. @default 4096 */
  shmMb?: number;
  /** Private memory per process, MB. @default 64 */
  pkgMb?: number;
  /** Database created for the PostgreSQL mode. @default "kamailio_bench" */
  database?: string;
  /** Directory for the pid file and log. @default a new temporary directory */
  workDir?: string;
  /** How long to wait for the first answer, ms. @default 15000 */
  startTimeoutMs?: number;
}

/** Whether the `kamailio` binary (and, for `postgres`, its PostgreSQL module) is installed. */
export function kamailioAvailable(store: StoreMode = "memory"): { ok: boolean; reason: string } {
  const exists = (p: string): boolean => {
    try {
      Deno.statSync(p);
      return true;
    } catch {
      return false;
    }
  };
  if (!exists("/usr/sbin/kamailio") && !exists("/usr/bin/kamailio")) {
    return { ok: false, reason: "kamailio is not installed (apt-get install -y kamailio)" };
  }
  if (!exists(KAMAILIO_CFG)) return { ok: false, reason: `missing ${KAMAILIO_CFG}` };
  if (store === "postgres") {
    if (!exists("/usr/lib/x86_64-linux-gnu/kamailio/modules/db_postgres.so")) {
      return { ok: false, reason: "kamailio-postgres-modules is not installed" };
    }
    if (!exists(`${SQL_DIR}/usrloc-create.sql`)) {
      return { ok: false, reason: `missing ${SQL_DIR}/usrloc-create.sql` };
    }
  }
  return { ok: true, reason: "" };
}

/** Creates the write-through database and loads Kamailio's standard and usrloc tables. */
export async function prepareKamailioDb(database: string): Promise<void> {
  await recreateDatabase(database);
  await psql([
    "-d",
    database,
    "-f",
    `${SQL_DIR}/standard-create.sql`,
    "-f",
    `${SQL_DIR}/usrloc-create.sql`,
  ]);
}

/** Starts Kamailio and waits until it answers OPTIONS. Stop it with `target.stop()`. */
export async function startKamailio(opts: KamailioOptions): Promise<Target> {
  const avail = kamailioAvailable(opts.store);
  if (!avail.ok) throw new Error(`Cannot start Kamailio: ${avail.reason}`);
  const port = opts.port ?? await freePort(5070);
  const dir = opts.workDir ?? await Deno.makeTempDir({ prefix: "citysip-bench-kamailio-" });
  const pidFile = `${dir}/kamailio-${port}.pid`;
  const logPath = `${dir}/kamailio-${port}.log`;
  const database = opts.database ?? "kamailio_bench";
  const args = [
    "-f",
    KAMAILIO_CFG,
    "-m",
    String(opts.shmMb ?? 4096),
    "-M",
    String(opts.pkgMb ?? 64),
    "-E",
    "-DD",
    "-P",
    pidFile,
    "-A",
    `PORT=${port}`,
  ];
  if (opts.store === "postgres") {
    await prepareKamailioDb(database);
    args.push("-A", "WITH_DB", "-A", `DBURL="postgres://postgres@127.0.0.1/${database}"`);
  }
  // `exec` keeps the pid: the shell only redirects output to the log.
  const quoted = args.map((a) => `'${a.replaceAll("'", `'\\''`)}'`).join(" ");
  const child = new Deno.Command("sh", {
    args: ["-c", `exec kamailio ${quoted} >'${logPath}' 2>&1`],
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
  const exited = child.status.then(() => true);
  const status = await Promise.race([
    probeSip("127.0.0.1", port, opts.startTimeoutMs ?? 15000),
    exited.then(() => -1),
  ]);
  if (status <= 0) {
    await stop();
    let log = "";
    try {
      log = Deno.readTextFileSync(logPath).slice(-2000);
    } catch { /* no log */ }
    throw new Error(
      `Cannot start Kamailio on port ${port}: ${status < 0 ? "it exited" : "no answer"}\n${log}`,
    );
  }
  return {
    name: "kamailio",
    store: opts.store,
    host: "127.0.0.1",
    port,
    pid,
    metricsUrl: null,
    logPath,
    stop,
  };
}

/** Starts Kamailio, runs `fn`, and stops Kamailio whatever happens. */
export async function withKamailio<T>(
  opts: KamailioOptions,
  fn: (t: Target) => Promise<T>,
): Promise<T> {
  const t = await startKamailio(opts);
  try {
    return await fn(t);
  } finally {
    await t.stop();
  }
}
