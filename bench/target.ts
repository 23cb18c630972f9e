/**
 * What the scenarios need of a server under test, whichever it is: its address, its process
 * (for memory and CPU), and a way to stop it. Also the helpers both targets use: a free port,
 * an OPTIONS probe, process-tree stopping, and a cleanup list run on exit and on signals.
 *
 * @module
 */

import dgram from "node:dgram";
import { optionsRequest, statusOf } from "./sip_scan.ts";
import { processTree } from "./measure.ts";

/** Where bindings live while the server runs. */
export type StoreMode = "memory" | "postgres";

/** A started server under test. */
export interface Target {
  /** `citysip` or `kamailio`. */
  name: string;
  /** Storage mode it was started in. */
  store: StoreMode;
  /** SIP address (UDP and TCP). */
  host: string;
  /** SIP port (UDP and TCP). */
  port: number;
  /** Root process id of the server (its tree is measured). */
  pid: number;
  /** Prometheus endpoint, when the server has one. */
  metricsUrl: string | null;
  /** File with the server's output. */
  logPath: string;
  /** Stops the server and every process it started; resolves when they are gone. */
  stop(): Promise<void>;
}

const cleanups = new Set<() => Promise<void>>();

/** Registers `fn` to run if the bench is interrupted; returns a function that unregisters it. */
export function onCleanup(fn: () => Promise<void>): () => void {
  cleanups.add(fn);
  return () => cleanups.delete(fn);
}

/** Runs every registered cleanup (used on SIGINT/SIGTERM and at the end of a run). */
export async function runCleanups(): Promise<void> {
  const fns = [...cleanups];
  cleanups.clear();
  await Promise.allSettled(fns.map((f) => f()));
}

/** Whether `port` is free for both UDP and TCP on 127.0.0.1. */
export async function portFree(port: number): Promise<boolean> {
  try {
    const l = Deno.listen({ hostname: "127.0.0.1", port });
    l.close();
  } catch {
    return false;
  }
  const u = dgram.createSocket("udp4");
  const ok = await new Promise<boolean>((resolve) => {
    u.once("error", () => resolve(false));
    u.bind(port, "127.0.0.1", () => resolve(true));
  });
  try {
    u.close();
  } catch { /* never bound */ }
  return ok;
}

/** First port from `start` (stepping by 1, at most 200 tries) free for UDP and TCP. */
export async function freePort(start: number): Promise<number> {
  for (let p = start; p < start + 200; p++) if (await portFree(p)) return p;
  throw new RangeError(`Cannot find a free port from ${start}`);
}

/**
 * Sends UDP OPTIONS every 200 ms until any SIP response arrives or `timeoutMs` passes.
 * Returns the status code seen, or 0.
 */
export async function probeSip(host: string, port: number, timeoutMs: number): Promise<number> {
  const sock = dgram.createSocket("udp4");
  await new Promise<void>((r) => sock.bind(0, "127.0.0.1", () => r()));
  const local = sock.address().port;
  let status = 0;
  sock.on("message", (b: Uint8Array) => {
    const st = statusOf(new TextDecoder("latin1").decode(b));
    if (st >= 200) status = st;
  });
  const end = performance.now() + timeoutMs;
  try {
    for (let i = 0; status === 0 && performance.now() < end && i < 1000; i++) {
      sock.send(optionsRequest(host, port, "127.0.0.1", local, "UDP", `p${i}`), port, host);
      await new Promise((r) => setTimeout(r, 200));
    }
  } finally {
    sock.close();
  }
  return status;
}

/** Whether process `pid` exists. */
export function alive(pid: number): boolean {
  try {
    Deno.statSync(`/proc/${pid}`);
    return true;
  } catch {
    return false;
  }
}

/**
 * Stops a process tree: SIGTERM to the root, wait up to `graceMs`, then SIGKILL to every
 * process of the tree still alive (the tree is listed before the first signal). With
 * `termAll`, SIGTERM goes to every process of the tree at once.
 */
export async function stopTree(pid: number, graceMs = 5000, termAll = false): Promise<void> {
  const tree = processTree(pid);
  const kill = (p: number, sig: Deno.Signal): void => {
    try {
      Deno.kill(p, sig);
    } catch { /* gone */ }
  };
  if (termAll) { for (const p of tree) kill(p, "SIGTERM"); }
  else kill(pid, "SIGTERM");
  const end = performance.now() + graceMs;
  while (performance.now() < end && tree.some(alive)) {
    await new Promise((r) => setTimeout(r, 50));
  }
  for (const p of tree) if (alive(p)) kill(p, "SIGKILL");
  for (let i = 0; i < 40 && tree.some(alive); i++) await new Promise((r) => setTimeout(r, 50));
}

/** Runs `psql` against the local PostgreSQL; throws with its output on failure. */
export async function psql(args: string[]): Promise<string> {
  const o = await new Deno.Command("psql", {
    args: ["-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-q", ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(o.stdout) + new TextDecoder().decode(o.stderr);
  if (!o.success) throw new Error(`Cannot run psql ${args.join(" ")}: ${text.trim()}`);
  return text;
}

/** Drops and creates database `name` on the local PostgreSQL. */
export async function recreateDatabase(name: string): Promise<void> {
  if (!/^[a-z_][a-z0-9_]*$/.test(name)) throw new RangeError(`Cannot use database name "${name}"`);
  await psql(["-d", "postgres", "-c", `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`]);
  await psql(["-d", "postgres", "-c", `CREATE DATABASE ${name}`]);
}
