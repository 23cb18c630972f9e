/**
 * The embedded default when no database URL is given: PGlite (PostgreSQL compiled to WASM) with its
 * data in a directory, served on 127.0.0.1 by pglite-socket, so that the same postgres.js code reaches
 * it as reaches a PostgreSQL server.
 *
 * Limits to know:
 * - One connection. PGlite is single-session; pglite-socket's multiplexer (`maxConnections` > 1)
 *   interleaves clients at protocol-message granularity, outside explicit transactions too, which
 *   postgres.js's pipelined extended protocol does not survive safely. So the server accepts one
 *   connection and the client pool must use `max: 1` (see {@link Embedded.maxConnections}).
 * - PGlite runs with fsync off: committed data survives a killed process (the OS has it), not a power
 *   loss. Production uses a PostgreSQL server.
 * - The first open of a new data directory takes seconds; later opens about a second.
 *
 * @module
 */
import { PGlite } from "@electric-sql/pglite";
import { PGLiteSocketServer } from "@electric-sql/pglite-socket";
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
}

/** A running embedded database. */
export interface Embedded {
  /** postgres.js URL of the embedded server. */
  readonly url: string;
  /** The pool size clients must use: 1. */
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
  const server = new PGLiteSocketServer({
    db,
    host: "127.0.0.1",
    port: options.port ?? 0,
    maxConnections: 1,
  });
  try {
    await server.start();
  } catch (err) {
    await db.close();
    throw err;
  }
  const t2 = performance.now();
  const port = Number(server.getServerConn().split(":").pop());
  let stopped: Promise<void> | undefined;
  return {
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    maxConnections: 1,
    dataDir,
    timings: { openMs: t1 - t0, listenMs: t2 - t1 },
    stop() {
      stopped ??= (async () => {
        await server.stop();
        await db.close();
      })();
      return stopped;
    },
  };
}
