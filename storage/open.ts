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
