/**
 * Opening storage: a postgres.js pool whose sockets the stores can drop when a commit hangs, the
 * migrations, and the two stores on top.
 *
 * @module
 */
import { connect as netConnect, type Socket } from "node:net";
import postgres from "postgres";
import { migrate } from "./migrate.ts";
import { PostgresLocationStore, type PostgresLocationStoreOptions } from "./postgres.ts";
import { PostgresSubscriberStore } from "./postgres.ts";

/** Options of {@link connect}. */
export interface ConnectOptions {
  /**
   * Pool size. Use 1 for the embedded store ({@link import("./embedded.ts").startEmbedded} says so).
   * @default {10}
   */
  readonly max?: number;
  /**
   * A schema to put first in `search_path` (tests use one each). Sent as a startup parameter, which
   * the embedded engine ignores.
   */
  readonly schema?: string;
  /**
   * Seconds to wait for a connection before failing the queries waiting for it.
   * @default {2}
   */
  readonly connectTimeoutSeconds?: number;
  /**
   * PostgreSQL's `idle_in_transaction_session_timeout` for these sessions, in ms, so that the
   * server ends a transaction (and frees its locks) whose client went silent. 0 leaves the server's
   * setting.
   * @default {10000}
   */
  readonly idleInTransactionTimeoutMs?: number;
}

/** A postgres.js instance, and a way to drop its current connections. */
export interface Connection {
  /** The pool. */
  readonly sql: postgres.Sql;
  /**
   * Destroys every socket of the pool: queries on them fail at once and postgres.js reconnects for
   * the next ones. For a connection that hangs (a silent network) rather than fails.
   */
  dropConnections(): void;
}

/** Creates a postgres.js pool for `url` whose sockets {@link Connection.dropConnections} can destroy. */
export function connect(url: string, options: ConnectOptions = {}): Connection {
  const sockets = new Set<Socket>();
  const connection: Record<string, string> = {};
  if (options.schema !== undefined) connection.search_path = options.schema;
  const idleMs = options.idleInTransactionTimeoutMs ?? 10_000;
  if (idleMs > 0) connection.idle_in_transaction_session_timeout = String(idleMs);
  const sql = postgres(url, {
    max: options.max ?? 10,
    connect_timeout: options.connectTimeoutSeconds ?? 2,
    // Reconnect quickly once the database is back (the default backoff grows to 20 s).
    backoff: () => 0.1,
    onnotice: () => {},
    connection,
    // Our own sockets, already connecting (postgres.js writes its startup message into the buffer),
    // so that dropConnections() can reach them.
    socket: (o: { host: string[]; port: number[]; path: string | false }) => {
      const s = o.path
        ? netConnect(o.path)
        : netConnect(o.port[0] ?? 5432, o.host[0] ?? "localhost");
      s.setNoDelay(true);
      sockets.add(s);
      s.once("close", () => sockets.delete(s));
      return s;
    },
  } as postgres.Options<Record<string, never>>);
  return {
    sql,
    dropConnections() {
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
  };
}

/** Options of {@link openStorage}. */
export interface OpenStorageOptions extends ConnectOptions {
  /** Options of the location store (group commit, outage behaviour). */
  readonly locations?: PostgresLocationStoreOptions;
  /**
   * Run migrations first.
   * @default {true}
   */
  readonly migrate?: boolean;
}

/** Storage opened by {@link openStorage}. */
export interface Storage {
  /** The location service, with group commit. */
  readonly locations: PostgresLocationStore;
  /** Subscribers and their credentials. */
  readonly subscribers: PostgresSubscriberStore;
  /** The pool both stores use (for health checks and admin queries). */
  readonly sql: postgres.Sql;
  /** Versions the start-up migration applied. */
  readonly migrated: readonly string[];
  /** Commits pending registrations, then closes the pool. */
  close(): Promise<void>;
}

/** Connects to `url`, runs migrations, and opens the location and subscriber stores. */
export async function openStorage(url: string, options: OpenStorageOptions = {}): Promise<Storage> {
  const conn = connect(url, options);
  let migrated: string[] = [];
  try {
    if (options.migrate ?? true) migrated = await migrate(conn.sql);
  } catch (err) {
    await conn.sql.end({ timeout: 0 });
    throw err;
  }
  const locations = new PostgresLocationStore(conn.sql, {
    onCommitTimeout: () => conn.dropConnections(),
    ...options.locations,
  });
  const subscribers = new PostgresSubscriberStore(conn.sql);
  return {
    locations,
    subscribers,
    sql: conn.sql,
    migrated,
    async close() {
      await locations.close();
      await conn.sql.end({ timeout: 1 });
    },
  };
}

let guarded = false;

const CONNECTION_CODES = new Set(["CONNECTION_CLOSED", "CONNECTION_DESTROYED", "CONNECTION_ENDED"]);

/**
 * Keeps the process alive through known postgres.js 3.4.9 bugs around a connection that closes under
 * a query (porsager/postgres#1154, #1208; the fix, #1168, is unreleased):
 * - a query written just as its connection closes throws `TypeError: Cannot read properties of null
 *   (reading 'write')` from a `setImmediate` callback, which no caller can catch;
 * - `sql.begin()` whose backend died leaves a `CONNECTION_CLOSED` rejection nobody handles.
 * The queries concerned have already been rejected to their callers. Installs global `error` and
 * `unhandledrejection` listeners that swallow exactly these (and report them to `onGuarded`);
 * everything else stays fatal. The batch path of {@link PostgresLocationStore} avoids the
 * deterministic case (it does not use `sql.begin()`); this covers the remaining races. Call once per
 * process, e.g. in each worker. Partial by nature: after the `sql.begin()` case the pool still serves
 * queries, but `sql.end()` waits for ever for the ROLLBACK written to the dead socket; end with a
 * timeout.
 */
export function guardPostgresConnectionLoss(onGuarded: (err: Error) => void = () => {}): void {
  if (guarded) return;
  guarded = true;
  globalThis.addEventListener("error", (event) => {
    const err = event.error;
    if (
      err instanceof TypeError && /reading 'write'/.test(err.message) &&
      /nextWrite/.test(err.stack ?? "") && /postgres/.test(err.stack ?? "")
    ) {
      event.preventDefault();
      onGuarded(err);
    }
  });
  globalThis.addEventListener("unhandledrejection", (event) => {
    const err = event.reason;
    if (
      err instanceof Error && CONNECTION_CODES.has((err as Error & { code?: string }).code ?? "")
    ) {
      event.preventDefault();
      onGuarded(err);
    }
  });
}
