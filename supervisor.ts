/**
 * The supervisor: `citysip serve` with N workers. It owns the database (migrations, the embedded engine,
 * the expiry sweep) and the metrics endpoint, and runs N worker processes of this same program, each a
 * whole stage pipeline on its own event loop. Workers share the SIP ports through SO_REUSEPORT, so the
 * kernel spreads TCP connections (and, with the FFI UDP transport, datagrams) over them. A worker that
 * dies is started again (its flows are lost; its bindings are in the database); SIGTERM drains them.
 *
 * Supervisor and worker talk over the worker's stdin/stdout, one JSON object per line: the worker
 * announces `{"type":"ready",...}` once listening, and answers each `metrics` line with its counters.
 *
 * @module
 */
import net from "node:net";
import dgram from "node:dgram";
import { ConfigError, type ListenSpec, type ServeConfig } from "./config.ts";
import { log } from "./log.ts";
import { renderMetrics, type WorkerMetrics } from "./metrics.ts";
import type { Embedded } from "./storage/embedded.ts";
import { startDatabase } from "./storage/cli.ts";
import { openStorage } from "./storage/open.ts";
/** A worker that does not stop within this after SIGTERM is killed. */
const DRAIN_TIMEOUT_MS = 10_000;

/** What a worker process is started with (in the environment variable `CITYSIP_WORKER`). */
export interface WorkerSpec {
  readonly id: number;
  readonly config: ServeConfig;
  /** The listeners this worker opens (UDP only on some workers when UDP cannot be shared). */
  readonly listen: readonly ListenSpec[];
  /** Database URL (the server, or the supervisor's embedded engine), or null for `--store memory`. */
  readonly dbUrl: string | null;
  /** Pool size for that database. */
  readonly dbPool: number;
  /** The digest nonce secret, hex, shared by all workers so any of them accepts any nonce. */
  readonly secret: string;
  /** Whether this worker sweeps expired bindings from the database (one worker does). */
  readonly sweep: boolean;
}

/** A worker's line on stdout. */
export type WorkerMessage =
  | { readonly type: "ready"; readonly udp: number[]; readonly tcp: number[] }
  | ({ readonly type: "metrics" } & WorkerMetrics);

interface Running {
  readonly id: number;
  child: Deno.ChildProcess;
  stdin: WritableStreamDefaultWriter<Uint8Array>;
  /** Resolvers of pending `metrics` requests, in order. */
  waiting: ((m: WorkerMetrics | null) => void)[];
  restarts: number;
}

/** How to start this program again: `deno run ... main.ts` or the compiled binary itself. */
function selfCommand(): string[] {
  const exe = Deno.execPath();
  const script = new URL("./main.ts", import.meta.url);
  const isDeno = /(^|\/)deno(\.exe)?$/.test(exe);
  return isDeno && script.protocol === "file:"
    ? ["run", "--allow-all", "--unstable-net", script.pathname]
    : [];
}

/**
 * Checks that every address is free (a second citysip on the same port would otherwise share it
 * silently through SO_REUSEPORT), and turns port 0 into one free port per host, the same for UDP and
 * TCP, so every worker binds the same.
 */
async function resolvePorts(listen: readonly ListenSpec[]): Promise<ListenSpec[]> {
  const chosen = new Map<string, number>();
  const out: ListenSpec[] = [];
  for (const spec of listen) {
    let port = spec.port === 0 ? chosen.get(spec.host) : spec.port;
    if (port === undefined) {
      port = await freePort(spec.host);
      chosen.set(spec.host, port);
    } else if (!(await probe(spec.transport, spec.host, port))) {
      throw new ConfigError(
        `cannot listen on ${spec.transport}:${spec.host}:${port}: address in use or not available`,
      );
    }
    out.push({ ...spec, port });
  }
  return out;
}

/** Binds and releases a socket: true if the address was free. */
async function probe(transport: "udp" | "tcp", host: string, port: number): Promise<boolean> {
  if (transport === "tcp") {
    const server = net.createServer();
    const ok = await new Promise<boolean>((resolve) => {
      server.once("error", () => resolve(false));
      server.listen({ host, port }, () => resolve(true));
    });
    if (ok) await new Promise((r) => server.close(r));
    return ok;
  }
  const udp = dgram.createSocket(host.includes(":") ? "udp6" : "udp4");
  const ok = await new Promise<boolean>((resolve) => {
    udp.once("error", () => resolve(false));
    udp.bind(port, host, () => resolve(true));
  });
  if (ok) await new Promise<void>((r) => udp.close(() => r()));
  return ok;
}

async function freePort(host: string): Promise<number> {
  for (let attempt = 0; attempt < 20; attempt++) {
    const server = net.createServer();
    const port = await new Promise<number>((resolve, reject) => {
      server.once("error", reject);
      server.listen({ host, port: 0 }, () => resolve((server.address() as net.AddressInfo).port));
    }).catch(() => 0);
    await new Promise((r) => server.close(r));
    if (port === 0) break;
    if (await probe("udp", host, port)) return port;
  }
  throw new ConfigError(`cannot listen on ${host}: no free port, or the address is not local`);
}

/** The lines of a byte stream (the supervisor-worker protocol, both ways), without their newline. */
export async function* readLines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let buffer = "";
  for await (const chunk of stream) {
    buffer += decoder.decode(chunk, { stream: true });
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      yield buffer.slice(0, nl);
      buffer = buffer.slice(nl + 1);
    }
  }
}

function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Runs the supervisor until SIGINT/SIGTERM. `udpShared` says whether every worker may bind UDP. */
export async function runSupervisor(config: ServeConfig, udpShared: boolean): Promise<void> {
  const listen = await resolvePorts(config.listen);
  // The supervisor migrates and then holds no connection; workers open their own (the embedded
  // engine serves each through its multiplexer, one transaction at a time).
  let embedded: Embedded | null = null;
  let dbUrl: string | null = null;
  if (config.store === "postgres") {
    ({ url: dbUrl, embedded } = await startDatabase(config));
    try {
      const storage = await openStorage(dbUrl, { max: 1 });
      if (storage.migrated.length > 0) {
        log.info("migrated", { versions: storage.migrated.join(",") });
      }
      await storage.close();
    } catch (error) {
      await embedded?.stop();
      throw error;
    }
  } else if (config.workers > 1) {
    log.warn("--store memory with several workers: each worker keeps its own bindings");
  }
  const secret = hex(crypto.getRandomValues(new Uint8Array(32)));
  const command = selfCommand();
  const workers: (Running | null)[] = new Array(config.workers).fill(null);
  let stopping = false;

  const specFor = (id: number): WorkerSpec => ({
    id,
    config: { ...config, listen },
    listen: udpShared || id === 0 ? listen : listen.filter((l) => l.transport === "tcp"),
    dbUrl,
    dbPool: embedded ? 1 : Math.max(2, Math.ceil(10 / config.workers)),
    secret,
    sweep: id === 0,
  });

  async function start(id: number, restarts: number): Promise<void> {
    const child = new Deno.Command(Deno.execPath(), {
      args: [...command, "worker"],
      env: { CITYSIP_WORKER: JSON.stringify(specFor(id)) },
      stdin: "piped",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const running: Running = {
      id,
      child,
      stdin: child.stdin.getWriter(),
      waiting: [],
      restarts,
    };
    workers[id] = running;
    const ready = Promise.withResolvers<void>();
    (async () => {
      for await (const line of readLines(child.stdout)) {
        let msg: WorkerMessage;
        try {
          msg = JSON.parse(line);
        } catch {
          continue;
        }
        if (msg.type === "ready") ready.resolve();
        else if (msg.type === "metrics") running.waiting.shift()?.(msg);
      }
    })().catch(() => {});
    let isReady = false;
    child.status.then((status) => {
      for (const w of running.waiting.splice(0)) w(null);
      if (stopping || workers[id] !== running) return;
      workers[id] = null;
      if (!isReady && restarts === 0) {
        ready.reject(new Error(`worker ${id} exited with ${status.code} while starting`));
        return;
      }
      const delay = Math.min(5000, 100 * 2 ** Math.min(restarts, 6));
      log.error("worker died; starting it again", {
        worker: id,
        code: status.code,
        signal: status.signal ?? "",
        delayMs: delay,
      });
      setTimeout(() => {
        if (!stopping) start(id, restarts + 1).catch(() => {});
      }, delay);
    });
    await ready.promise;
    isReady = true;
    if (restarts > 0) log.info("worker restarted", { worker: id, pid: child.pid });
  }

  try {
    await Promise.all(workers.map((_, id) => start(id, 0)));
  } catch (error) {
    stopping = true;
    for (const w of workers) if (w) tryKill(w.child, "SIGKILL");
    await embedded?.stop();
    throw error;
  }
  for (const spec of listen) {
    log.info("listening", {
      transport: spec.transport,
      address: spec.host,
      port: spec.port,
      workers: config.workers,
    });
  }

  async function collect(): Promise<WorkerMetrics[]> {
    const all = await Promise.all(workers.map((w) => {
      if (w === null) return Promise.resolve(null);
      const { promise, resolve } = Promise.withResolvers<WorkerMetrics | null>();
      w.waiting.push(resolve);
      w.stdin.write(new TextEncoder().encode("metrics\n")).catch(() => resolve(null));
      return Promise.race([promise, new Promise<null>((r) => setTimeout(() => r(null), 2000))]);
    }));
    return all.filter((m): m is WorkerMetrics => m !== null);
  }

  let metrics: Deno.HttpServer | null = null;
  if (config.metrics) {
    metrics = Deno.serve({
      hostname: config.metrics.host,
      port: config.metrics.port,
      onListen: (addr) => log.info("metrics", { address: addr.hostname, port: addr.port }),
    }, async () => {
      const per = await collect();
      let text = renderMetrics(per);
      text +=
        `# HELP citysip_workers Worker processes running.\n# TYPE citysip_workers gauge\ncitysip_workers ${per.length}\n`;
      text +=
        `# HELP citysip_worker_restarts_total Times a worker was started again after dying.\n# TYPE citysip_worker_restarts_total counter\n`;
      text += workers.map((w, id) =>
        `citysip_worker_restarts_total{worker="${id}"} ${w?.restarts ?? 0}`
      ).join("\n") + "\n";
      return new Response(text, { headers: { "content-type": "text/plain; version=0.0.4" } });
    });
  }

  const { promise: stopped, resolve: stop } = Promise.withResolvers<string>();
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(signal, () => stop(signal));
  }
  const signal = await stopped;
  stopping = true;
  log.info("stopping", { signal });
  await Promise.all(workers.map(async (w) => {
    if (w === null) return;
    tryKill(w.child, "SIGTERM");
    const timer = setTimeout(() => tryKill(w.child, "SIGKILL"), DRAIN_TIMEOUT_MS);
    await w.child.status;
    clearTimeout(timer);
  }));
  await metrics?.shutdown();
  await embedded?.stop();
  log.info("stopped");
}

function tryKill(child: Deno.ChildProcess, signal: Deno.Signal): void {
  try {
    child.kill(signal);
  } catch {
    // already gone
  }
}
