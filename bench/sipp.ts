/**
 * The same REGISTER load through SIPp, the tool operators trust, with the scenario file
 * `/work/shared/peers/kamailio/register.xml` (override with env `SIPP_REGISTER_XML`) and a
 * users CSV of distinct users. Used to check that our own generator is not the bottleneck.
 *
 * @module
 */

import { onCleanup, stopTree } from "./target.ts";

/** Default SIPp scenario file. */
export const SIPP_REGISTER_XML: string = Deno.env.get("SIPP_REGISTER_XML") ??
  new URL("../../shared/peers/kamailio/register.xml", import.meta.url).pathname;

/** Options of {@linkcode runSipp}. */
export interface SippOptions {
  /** Server address. */
  host: string;
  /** Server port. */
  port: number;
  /** SIPp transport: `u1` one UDP socket, `t1` one TCP connection, `tn` a connection per call. */
  transport: "u1" | "t1" | "tn";
  /** Calls (REGISTERs) to place. */
  calls: number;
  /** Calls in flight at most (`-l`). */
  limit: number;
  /** Calls per second (`-r`); a large value makes it a closed loop at `limit`. */
  rate: number;
  /** Global time limit, s. */
  timeoutS: number;
  /** Users in the injection file. @default calls */
  users?: number;
  /** CPUs to run SIPp on (a `taskset` list, e.g. "1"); any when left out. */
  cpus?: string;
}

/** What one SIPp run did. */
export interface SippResult {
  /** Command line used. */
  command: string;
  /** Successful calls (200 received). */
  ok: number;
  /** Failed calls. */
  failed: number;
  /** Wall time of the SIPp process, s. */
  wall_s: number;
  /** SIPp's own running time (first to last statistics dump), s. */
  active_s: number | null;
  /** Successful calls per second of SIPp's running time (wall time if unknown). */
  rate_per_s: number;
  /** SIPp's mean response time, ms. */
  mean_response_ms: number | null;
  /** SIPp's own CPU, in cores, sampled from /proc. */
  sipp_cores: number | null;
}

/** Whether `sipp` is installed. */
export function sippAvailable(): boolean {
  try {
    Deno.statSync("/usr/bin/sipp");
    Deno.statSync(SIPP_REGISTER_XML);
    return true;
  } catch {
    return false;
  }
}

/** Writes a SIPp injection file of users `u000000`..; returns its path. */
export async function writeUsersCsv(dir: string, n: number): Promise<string> {
  const lines = ["SEQUENTIAL"];
  for (let i = 0; i < n; i++) lines.push("u" + String(i).padStart(6, "0"));
  const path = `${dir}/users.csv`;
  await Deno.writeTextFile(path, lines.join("\n") + "\n");
  return path;
}

function parseSippTime(s: string | undefined): number | null {
  // HH:MM:SS:uuuuuu
  if (!s) return null;
  const m = s.match(/^(\d+):(\d+):(\d+):(\d+)$/);
  if (!m) return null;
  return ((Number(m[1]) * 60 + Number(m[2])) * 60 + Number(m[3])) * 1000 + Number(m[4]) / 1000;
}

/** Runs SIPp once and parses its statistics file. */
export async function runSipp(o: SippOptions): Promise<SippResult> {
  const dir = await Deno.makeTempDir({ prefix: "citysip-bench-sipp-" });
  try {
    const csv = await writeUsersCsv(dir, o.users ?? o.calls);
    const stats = `${dir}/stats.csv`;
    const args = [
      "-sf",
      SIPP_REGISTER_XML,
      "-inf",
      csv,
      `${o.host}:${o.port}`,
      "-t",
      o.transport,
      "-m",
      String(o.calls),
      "-l",
      String(o.limit),
      "-r",
      String(o.rate),
      "-timeout",
      `${o.timeoutS}s`,
      "-nostdin",
      "-trace_stat",
      "-stf",
      stats,
      "-fd",
      "1",
      "-max_socket",
      "15000",
    ];
    const t0 = performance.now();
    const child = new Deno.Command(o.cpus === undefined ? "sipp" : "taskset", {
      args: o.cpus === undefined ? args : ["-c", o.cpus, "sipp", ...args],
      cwd: dir,
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).spawn();
    const unregister = onCleanup(() => stopTree(child.pid, 1000));
    let ticks = 0;
    const sample = (): void => {
      try {
        const s = Deno.readTextFileSync(`/proc/${child.pid}/stat`);
        const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
        ticks = Number(f[11]) + Number(f[12]);
      } catch { /* exited */ }
    };
    const timer = setInterval(sample, 100);
    // SIPp's -timeout does not always end it (calls still retransmitting): our own bound.
    const killer = setTimeout(() => {
      try {
        Deno.kill(child.pid, "SIGKILL");
      } catch { /* exited */ }
    }, (o.timeoutS + 3) * 1000);
    await child.status;
    clearTimeout(killer);
    clearInterval(timer);
    unregister();
    const wall = (performance.now() - t0) / 1000;
    let text = "";
    try {
      text = await Deno.readTextFile(stats);
    } catch { /* no stats */ }
    const rows = text.trim().split("\n");
    const head = (rows[0] ?? "").split(";");
    const last = (rows[rows.length - 1] ?? "").split(";");
    const field = (name: string): string | undefined => {
      const i = head.indexOf(name);
      return i >= 0 ? last[i] : undefined;
    };
    // StartTime/CurrentTime read "date<TAB>time<TAB>epoch.micros": SIPp's own clock, without
    // its start-up.
    const epoch = (v: string | undefined): number => Number((v ?? "").split("\t").pop());
    const active = epoch(field("CurrentTime")) - epoch(field("StartTime"));
    const ok = Number(field("SuccessfulCall(C)") ?? 0);
    const failed = Number(field("FailedCall(C)") ?? 0);
    return {
      command: ["sipp", ...args].join(" "),
      ok,
      failed,
      wall_s: Math.round(wall * 1000) / 1000,
      active_s: Number.isFinite(active) && active > 0 ? Math.round(active * 1000) / 1000 : null,
      rate_per_s: Math.round(ok / (Number.isFinite(active) && active > 0 ? active : wall)),
      mean_response_ms: parseSippTime(field("ResponseTime1(C)")),
      sipp_cores: ticks > 0 ? Math.round((ticks / 100 / wall) * 100) / 100 : null,
    };
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => undefined);
  }
}
