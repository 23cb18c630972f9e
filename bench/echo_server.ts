/**
 * A tiny TCP echo server (no SIP), the counterpart of the paper's echo server in the
 * connection-scale test: it accepts, echoes every byte, and holds connections idle.
 * Several processes share one port (`reusePort`), so it can hold more flows than one
 * process's file limit. {@linkcode startEchoServer} starts them as subprocesses.
 *
 * Run directly: `deno run -A bench/echo_server.ts PORT`.
 *
 * @module
 */

import net from "node:net";
import { onCleanup, stopTree } from "./target.ts";
import type { Target } from "./target.ts";

/** Serves on 127.0.0.1:`port` in this process; prints `ready` once listening. */
export function serveEcho(port: number): void {
  const server = net.createServer({ noDelay: true }, (s) => {
    s.on("data", (b) => s.write(b));
    s.on("error", () => s.destroy());
  });
  server.maxConnections = 19_000;
  server.listen({ host: "127.0.0.1", port, reusePort: true, backlog: 4096 }, () => {
    console.log("ready");
  });
}

/**
 * Starts `processes` echo server processes on `port` (one per 18,000 flows wanted) under one
 * `sh` parent, so that the tree is measured and stopped as one.
 */
export async function startEchoServer(port: number, processes: number): Promise<Target> {
  const self = new URL(import.meta.url).pathname;
  const one = `'${Deno.execPath()}' run -A '${self}' ${port}`;
  const script = Array.from({ length: processes }, () => `${one} &`).join("\n") + "\nwait";
  const child = new Deno.Command("sh", {
    args: ["-c", script],
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  let ready = 0;
  const reader = child.stdout.getReader();
  const dec = new TextDecoder();
  const deadline = performance.now() + 15000;
  while (ready < processes && performance.now() < deadline) {
    const r = await Promise.race([
      reader.read(),
      new Promise<null>((res) => setTimeout(() => res(null), 500)),
    ]);
    if (r === null) continue;
    if (r.done) break;
    ready += (dec.decode(r.value).match(/ready/g) ?? []).length;
  }
  // Keep draining stdout so the processes never block on a full pipe.
  (async () => {
    try {
      for (;;) if ((await reader.read()).done) break;
    } catch { /* closed */ }
  })();
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    unregister();
    await stopTree(child.pid, 3000, true);
    await child.status;
  };
  const unregister = onCleanup(stop);
  if (ready < processes) {
    await stop();
    throw new Error(`Cannot start echo server on port ${port}: ${ready}/${processes} ready`);
  }
  return {
    name: "echo",
    store: "memory",
    host: "127.0.0.1",
    port,
    pid: child.pid,
    metricsUrl: null,
    logPath: "",
    stop,
  };
}

if (import.meta.main) {
  const port = Number(Deno.args[0]);
  if (!Number.isInteger(port) || port <= 0) {
    console.error(`Cannot start: invalid port "${Deno.args[0] ?? ""}"`);
    Deno.exit(2);
  }
  serveEcho(port);
}
