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
import { ConfigError, parseServeArgs, SERVE_HELP } from "./config.ts";
import { setLogLevel } from "./log.ts";
import { runStorageCommand } from "./storage/cli.ts";
import { runSupervisor, type WorkerSpec } from "./supervisor.ts";
import { runWorkerProcess } from "./worker.ts";
import { listenUdpReusePort } from "./transport/udp_ffi.ts";
import { listenTcpReusePort } from "./transport/tcp_ffi.ts";

/** The program's version. */
export const VERSION = "0.1.0";

const HELP = `citysip ${VERSION}: a SIP registrar for a city's subscribers

Usage:
  citysip serve [options]           run the registrar (citysip serve --help)
  citysip migrate [--db URL]        apply database migrations
  citysip user add|del|list [...]   manage subscribers (citysip user --help)
  citysip --version | --help`;

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
        if (config.auth && config.store === "memory") {
          throw new ConfigError("--auth needs subscribers: use --store postgres");
        }
        setLogLevel(config.logLevel);
        await runSupervisor(config, config.udpTransport === "reuseport");
        return 0;
      }
      case "worker": {
        const raw = Deno.env.get("CITYSIP_WORKER");
        if (raw === undefined) throw new ConfigError("worker is started by serve, not by hand");
        const spec = JSON.parse(raw) as WorkerSpec;
        await runWorkerProcess(
          spec,
          spec.config.udpTransport === "reuseport" ? listenUdpReusePort : undefined,
          spec.config.tcpTransport === "reuseport"
            // The frame stage copies what it keeps (a partial message, an admitted request).
            ? (host, port, onConnection) =>
              listenTcpReusePort(host, port, onConnection, { lendChunks: true })
            : undefined,
        );
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
