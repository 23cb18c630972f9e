/**
 * The embedded default when no database URL is given: PGlite (PostgreSQL compiled to WASM) with its
 * data in a directory, served on 127.0.0.1 over the PostgreSQL wire protocol, so that the same
 * postgres.js code reaches it as reaches a PostgreSQL server.
 *
 * Limits to know:
 * - PGlite is one backend session. pglite-socket's server (`server: "pglite-socket"`) accepts one
 *   connection by default, and with `maxConnections` > 1 its multiplexer interleaves clients message by
 *   message, which postgres.js's extended protocol does not survive ("portal does not exist"; a
 *   second pool connection against the default limit hangs until the connect timeout). The default
 *   server here (`"mux"`, {@link PgliteMux}) hands the engine over only between whole protocol units
 *   and outside transactions, so any number of processes may connect (the supervisor and every
 *   worker); the engine still runs one statement at a time, so each client's pool should be 1.
 * - Startup parameters (search_path, idle_in_transaction_session_timeout) are not applied.
 * - PGlite runs with fsync off: committed data survives a killed process (the OS has it), not a power
 *   loss. Production uses a PostgreSQL server.
 * - The first open of a new data directory takes seconds; later opens about a second.
 *
 * @module
 */
import { PGlite } from "@electric-sql/pglite";
import { PGLiteSocketServer } from "@electric-sql/pglite-socket";
import { PgliteMux } from "./_pglite_mux.ts";
import { join } from "node:path";
import { homedir } from "node:os";

/** Options of {@link startEmbedded}. */
export interface EmbeddedOptions {
  /**
   * Where PGlite keeps its data.
   * @default {defaultDataDir()}
   */
  readonly dataDir?: string;
  /**
   * TCP port on 127.0.0.1; 0 picks a free one.
   * @default {0}
   */
  readonly port?: number;
  /**
   * Which wire-protocol server: `"mux"` (several clients, see the module doc) or pglite-socket's
   * `PGLiteSocketServer` with one connection.
   * @default {"mux"}
   */
  readonly server?: "mux" | "pglite-socket";
}

/** A running embedded database. */
export interface Embedded {
  /** postgres.js URL of the embedded server. */
  readonly url: string;
  /** The pool size each client should use: 1 (the engine runs one statement at a time). */
  readonly maxConnections: 1;
  /** The data directory in use. */
  readonly dataDir: string;
  /** Milliseconds taken to open the data directory, and to start listening. */
  readonly timings: { readonly openMs: number; readonly listenMs: number };
  /** Stops the socket server and closes the database (which flushes it). */
  stop(): Promise<void>;
}

/** `$XDG_STATE_HOME/citysip/pglite`, or `~/.local/state/citysip/pglite`. */
export function defaultDataDir(): string {
  const state = Deno.env.get("XDG_STATE_HOME") || join(homedir(), ".local", "state");
  return join(state, "citysip", "pglite");
}

/** Opens (creating if needed) the PGlite data directory and serves it on 127.0.0.1. */
export async function startEmbedded(options: EmbeddedOptions = {}): Promise<Embedded> {
  const dataDir = options.dataDir ?? defaultDataDir();
  const t0 = performance.now();
  await Deno.mkdir(dataDir, { recursive: true });
  const db = await PGlite.create({ dataDir });
  const t1 = performance.now();
  let port: number;
  let stopServer: () => Promise<void>;
  try {
    if ((options.server ?? "mux") === "mux") {
      const mux = new PgliteMux(db);
      port = await mux.listen(options.port ?? 0, "127.0.0.1");
      stopServer = () => mux.close();
    } else {
      const server = new PGLiteSocketServer({
        db,
        host: "127.0.0.1",
        port: options.port ?? 0,
        maxConnections: 1,
      });
      await server.start();
      port = Number(server.getServerConn().split(":").pop());
      stopServer = () => server.stop();
    }
  } catch (err) {
    await db.close();
    throw err;
  }
  const t2 = performance.now();
  let stopped: Promise<void> | undefined;
  return {
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    maxConnections: 1,
    dataDir,
    timings: { openMs: t1 - t0, listenMs: t2 - t1 },
    stop() {
      stopped ??= (async () => {
        await stopServer();
        await db.close();
      })();
      return stopped;
    },
  };
}
