/**
 * citysip: the command-line entry.
 *
 * - `citysip serve [options]`: the registrar (see `citysip serve --help`).
 * - `citysip migrate [--db URL | --data-dir DIR]`: applies the database migrations.
 * - `citysip user add|del|list ...`: manages subscribers for digest authentication.
 *
 * A bad flag or value prints one line and exits with status 2.
 *
 * @module
 */
import { ConfigError, parseServeArgs, SERVE_HELP, type ServeConfig } from "./config.ts";
import { log, setLogLevel } from "./log.ts";
import { renderMetrics } from "./metrics.ts";
import { MemoryLocationStore } from "./storage/memory.ts";
import type { LocationStore } from "./storage/location_store.ts";
import type { SubscriberStore } from "./storage/subscriber_store.ts";
import { startWorker } from "./worker.ts";
import { openConfiguredStorage, runStorageCommand } from "./storage/cli.ts";
import { DigestAuthenticator } from "./stages/auth.ts";
import type { RegistrarAuth } from "./stages/registrar.ts";

/** The program's version. */
export const VERSION = "0.1.0";

const HELP = `citysip ${VERSION}: a SIP registrar for a city's subscribers

Usage:
  citysip serve [options]           run the registrar (citysip serve --help)
  citysip migrate [--db URL]        apply database migrations
  citysip user add|del|list [...]   manage subscribers (citysip user --help)
  citysip --version | --help`;

/** Bindings are swept from the store this often. */
const SWEEP_INTERVAL_MS = 30_000;

async function serve(config: ServeConfig): Promise<void> {
  setLogLevel(config.logLevel);
  let store: LocationStore;
  let subscribers: SubscriberStore | null = null;
  let closeStorage = async () => {};
  if (config.store === "memory") {
    if (config.auth) throw new ConfigError("--auth needs subscribers: use --store postgres");
    store = new MemoryLocationStore();
    log.warn("bindings are kept in memory only (--store memory): a restart loses them");
  } else {
    const storage = await openConfiguredStorage(config);
    store = storage.locations;
    subscribers = storage.subscribers;
    closeStorage = storage.close;
  }
  let auth: RegistrarAuth | null = null;
  if (config.auth && subscribers !== null) {
    auth = new DigestAuthenticator({
      subscribers,
      secret: crypto.getRandomValues(new Uint8Array(32)),
    });
  }
  const worker = await startWorker({ id: 0, config, store, auth });
  for (const t of worker.udp) {
    log.info("listening", { transport: "udp", address: t.address, port: t.port });
  }
  for (const t of worker.tcp) {
    log.info("listening", { transport: "tcp", address: t.address, port: t.port });
  }

  const sweep = setInterval(() => {
    store.sweep(Date.now()).catch((error) => log.warn("expiry sweep failed", { error }));
  }, SWEEP_INTERVAL_MS);
  let metrics: Deno.HttpServer | null = null;
  if (config.metrics) {
    metrics = Deno.serve({
      hostname: config.metrics.host,
      port: config.metrics.port,
      onListen: (addr) => log.info("metrics", { address: addr.hostname, port: addr.port }),
    }, () =>
      new Response(
        renderMetrics([{
          worker: worker.id,
          stages: worker.stages.map((s) => s.snapshot()),
          flowsOpen: worker.flows.size,
          responses: worker.responses,
        }]),
        { headers: { "content-type": "text/plain; version=0.0.4" } },
      ));
  }

  const { promise: stopped, resolve: stop } = Promise.withResolvers<string>();
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(signal, () => stop(signal));
  }
  const signal = await stopped;
  log.info("stopping", { signal });
  clearInterval(sweep);
  await metrics?.shutdown();
  await worker.close();
  await store.close();
  await closeStorage();
  log.info("stopped");
}

/** Runs the command line; resolves to the exit status. */
export async function main(args: string[]): Promise<number> {
  const [command, ...rest] = args;
  try {
    switch (command) {
      case "serve": {
        const config = parseServeArgs(rest, Deno.env.toObject());
        if (config === "help") {
          console.log(SERVE_HELP);
          return 0;
        }
        await serve(config);
        return 0;
      }
      case "migrate":
      case "user":
        return await runStorageCommand(command, rest);
      case "--version":
      case "-V":
        console.log(`citysip ${VERSION}`);
        return 0;
      case "--help":
      case "-h":
      case undefined:
        console.log(HELP);
        return command === undefined ? 2 : 0;
      default:
        throw new ConfigError(`unknown command "${command}"`);
    }
  } catch (error) {
    if (error instanceof ConfigError) {
      console.error(`citysip: Cannot start: ${error.message}`);
      return 2;
    }
    throw error;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
