/**
 * Group-commit throughput of {@link PostgresLocationStore} through its API: rows committed per second
 * for batches of 100 and 1,000 concurrent `register()` calls, new bindings (inserts) and refreshes
 * (updates), and with 100 or 1,000 clients each refreshing again as soon as it got its answer
 * (closed loop, batches form while the previous one commits), against a PostgreSQL server or the
 * embedded engine. Each run uses a throw-away schema
 * (server) or data directory (embedded).
 *
 * ```sh
 * deno run -A storage/group_commit_bench.ts [--db URL] [--embedded [--embedded-server mux|pglite-socket]]
 *   [--rounds 20] [--json]
 * ```
 *
 * @module
 */
import { parseArgs } from "node:util";
import postgres from "postgres";
import type { RegisterChange } from "./location_store.ts";
import { startEmbedded } from "./embedded.ts";
import { openStorage, type Storage } from "./open.ts";

/** One measured configuration. */
export interface GroupCommitResult {
  /** PostgreSQL server or embedded engine. */
  readonly target: "server" | "embedded";
  /** Concurrent `register()` calls per round, or clients in the closed loop; also `maxBatchSize`. */
  readonly batch: number;
  /** Rounds of `batch` concurrent new bindings, then refreshes; or `batch` clients refreshing in a loop. */
  readonly kind: "insert" | "refresh" | "closed-loop";
  /** Rounds measured (0 for the closed loop, which runs 3 s). */
  readonly rounds: number;
  /** Registrations committed per second. */
  readonly rowsPerSecond: number;
  /** Mean time from BEGIN to COMMIT of a batch. */
  readonly meanBatchMs: number;
  /** Batches committed. */
  readonly batches: number;
}

function registration(aor: string, cseq: number, now: number): RegisterChange {
  return {
    aor,
    callId: `${aor}-call`,
    cseq,
    contacts: [{
      key: `${aor};contact`,
      contact: `<${aor.replace("@", "-ua@")};transport=tcp>`,
      expires: 3600,
      q: null,
      instanceId: null,
      regId: null,
    }],
    removeAll: false,
    now,
    source: { transport: "tcp", address: "198.51.100.20", port: 40000, worker: 0, flowId: 1 },
    path: [],
    userAgent: "bench/1",
    maxBindings: 10,
  };
}

/** Runs `rounds` rounds of `batch` concurrent registrations: first new AORs, then refreshes of them. */
export async function measure(
  storage: Storage,
  target: "server" | "embedded",
  batch: number,
  rounds: number,
): Promise<GroupCommitResult[]> {
  const store = storage.locations;
  const results: GroupCommitResult[] = [];
  const aors = Array.from(
    { length: rounds },
    (_, r) => Array.from({ length: batch }, (_, i) => `sip:b${batch}r${r}u${i}@bench.example`),
  );
  for (const kind of ["insert", "refresh"] as const) {
    const before = store.stats();
    const started = performance.now();
    let ok = 0;
    for (let r = 0; r < rounds; r++) {
      const now = Date.now();
      const cseq = kind === "insert" ? 1 : 2;
      const outcomes = await Promise.all(
        aors[r]!.map((aor) => store.register(registration(aor, cseq, now))),
      );
      ok += outcomes.filter((o) => o.ok).length;
    }
    const seconds = (performance.now() - started) / 1000;
    const after = store.stats();
    const batches = after.batches - before.batches;
    results.push({
      target,
      batch,
      kind,
      rounds,
      rowsPerSecond: Math.round(ok / seconds),
      meanBatchMs: (after.commitSeconds.sum - before.commitSeconds.sum) * 1000 / batches,
      batches,
    });
  }
  results.push(await closedLoop(storage, target, batch, 3000));
  return results;
}

/** `clients` concurrent clients, each refreshing its binding again as soon as the last one committed. */
export async function closedLoop(
  storage: Storage,
  target: "server" | "embedded",
  clients: number,
  durationMs: number,
): Promise<GroupCommitResult> {
  const store = storage.locations;
  const before = store.stats();
  const started = performance.now();
  let ok = 0;
  await Promise.all(Array.from({ length: clients }, async (_, i) => {
    const aor = `sip:loop${clients}c${i}@bench.example`;
    for (let cseq = 1; performance.now() - started < durationMs; cseq++) {
      if ((await store.register(registration(aor, cseq, Date.now()))).ok) ok++;
    }
  }));
  const seconds = (performance.now() - started) / 1000;
  const after = store.stats();
  const batches = after.batches - before.batches;
  return {
    target,
    batch: clients,
    kind: "closed-loop",
    rounds: 0,
    rowsPerSecond: Math.round(ok / seconds),
    meanBatchMs: (after.commitSeconds.sum - before.commitSeconds.sum) * 1000 / batches,
    batches,
  };
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      db: { type: "string", default: "postgres://postgres@127.0.0.1:5432/test" },
      embedded: { type: "boolean", default: false },
      "embedded-server": { type: "string", default: "mux" },
      rounds: { type: "string", default: "20" },
      json: { type: "boolean", default: false },
    },
  });
  const rounds = Number(values.rounds);
  const all: GroupCommitResult[] = [];
  for (const batch of [100, 1000]) {
    const options = { locations: { maxBatchSize: batch, batchWindowMs: 2 } };
    if (values.embedded) {
      const dataDir = await Deno.makeTempDir({ prefix: "citysip-bench-" });
      const server = values["embedded-server"] === "pglite-socket" ? "pglite-socket" : "mux";
      const embedded = await startEmbedded({ dataDir, server });
      const storage = await openStorage(embedded.url, { ...options, max: 1 });
      try {
        all.push(...await measure(storage, "embedded", batch, rounds));
      } finally {
        await storage.close();
        await embedded.stop();
        await Deno.remove(dataDir, { recursive: true });
      }
    } else {
      const schema = `citysip_bench_${crypto.randomUUID().replaceAll("-", "").slice(0, 12)}`;
      const admin = postgres(values.db, { max: 1, onnotice: () => {} });
      await admin.unsafe(`CREATE SCHEMA ${schema}`);
      const storage = await openStorage(values.db, { ...options, schema });
      try {
        all.push(...await measure(storage, "server", batch, rounds));
      } finally {
        await storage.close();
        await admin.unsafe(`DROP SCHEMA ${schema} CASCADE`);
        await admin.end();
      }
    }
  }
  if (values.json) console.log(JSON.stringify(all));
  else {
    console.log("target    batch  kind         rows/s  mean batch ms  batches");
    for (const r of all) {
      console.log(
        `${r.target.padEnd(9)} ${String(r.batch).padStart(5)}  ${r.kind.padEnd(11)} ${
          String(r.rowsPerSecond).padStart(7)
        }  ${r.meanBatchMs.toFixed(1).padStart(13)}  ${String(r.batches).padStart(7)}`,
      );
    }
  }
}
