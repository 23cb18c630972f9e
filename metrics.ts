/**
 * Prometheus text exposition (format 0.0.4) of the stage counters and histograms, per worker.
 *
 * @module
 */
import { LATENCY_BUCKETS, type StageSnapshot } from "./stages/runtime.ts";

/** What one worker reports. */
export interface WorkerMetrics {
  readonly worker: number;
  readonly stages: readonly StageSnapshot[];
  readonly flowsOpen: number;
  /** Registrar responses by status code. */
  readonly responses: Readonly<Record<string, number>>;
  /** Any other gauges or counters, by full metric name. */
  readonly extra?: Readonly<Record<string, number>>;
}

const HELP: Record<string, [string, string]> = {
  citysip_stage_arrivals_total: ["counter", "Items offered to the stage."],
  citysip_stage_admitted_total: ["counter", "Items the stage accepted."],
  citysip_stage_completed_total: ["counter", "Items the stage finished."],
  citysip_stage_dropped_total: ["counter", "Items dropped or refused, by reason."],
  citysip_stage_queue_length: ["gauge", "Items waiting."],
  citysip_stage_queue_capacity: ["gauge", "Queue bound."],
  citysip_stage_in_flight: ["gauge", "Items in service."],
  citysip_stage_queue_delay_seconds: [
    "gauge",
    "Queue delay a new item can expect: items waiting times the wall time per item (admission).",
  ],
  citysip_stage_seconds_per_item: [
    "gauge",
    "Wall time per item taken while the queue was backlogged (the inverse of the drain rate).",
  ],
  citysip_stage_standing: [
    "gauge",
    "1 while the queue is standing: every item taken for 100 ms waited over the target (overload).",
  ],
  citysip_stage_queue_wait_seconds: ["histogram", "Time items waited in the queue."],
  citysip_stage_service_seconds: ["histogram", "Time items spent in service."],
  citysip_flows_open: ["gauge", "TCP flows held."],
  citysip_responses_total: ["counter", "Registrar responses by status code."],
};

/** Renders the metrics of some workers as Prometheus text. */
export function renderMetrics(workers: readonly WorkerMetrics[]): string {
  const lines = new Map<string, string[]>();
  const add = (name: string, labels: string, value: number, family = name) => {
    let l = lines.get(family);
    if (!l) lines.set(family, l = []);
    l.push(`${name}${labels ? `{${labels}}` : ""} ${Number.isFinite(value) ? value : 0}`);
  };
  for (const w of workers) {
    const wl = `worker="${w.worker}"`;
    for (const s of w.stages) {
      const sl = `stage="${s.name}",${wl}`;
      add("citysip_stage_arrivals_total", sl, s.arrivals);
      add("citysip_stage_admitted_total", sl, s.admitted);
      add("citysip_stage_completed_total", sl, s.completed);
      for (const [reason, n] of Object.entries(s.dropped)) {
        add("citysip_stage_dropped_total", `${sl},reason="${reason}"`, n);
      }
      add("citysip_stage_queue_length", sl, s.queueLength);
      add("citysip_stage_queue_capacity", sl, s.queueCapacity);
      add("citysip_stage_in_flight", sl, s.inFlight);
      add("citysip_stage_queue_delay_seconds", sl, s.queueDelayMs / 1000);
      add("citysip_stage_seconds_per_item", sl, s.perItemMs / 1000);
      add("citysip_stage_standing", sl, s.standing ? 1 : 0);
      for (
        const [name, h] of [
          ["citysip_stage_queue_wait_seconds", s.queueWait],
          ["citysip_stage_service_seconds", s.serviceTime],
        ] as const
      ) {
        let cumulative = 0;
        LATENCY_BUCKETS.forEach((le, i) => {
          cumulative += h.counts[i]!;
          add(`${name}_bucket`, `${sl},le="${le}"`, cumulative, name);
        });
        add(`${name}_bucket`, `${sl},le="+Inf"`, h.count, name);
        add(`${name}_sum`, sl, h.sum, name);
        add(`${name}_count`, sl, h.count, name);
      }
    }
    add("citysip_flows_open", wl, w.flowsOpen);
    for (const [status, n] of Object.entries(w.responses)) {
      add("citysip_responses_total", `code="${status}",${wl}`, n);
    }
    for (const [name, v] of Object.entries(w.extra ?? {})) add(name, wl, v);
  }
  let out = "";
  for (const [name, l] of lines) {
    const help = HELP[name];
    if (help) out += `# HELP ${name} ${help[1]}\n# TYPE ${name} ${help[0]}\n`;
    out += l.join("\n") + "\n";
  }
  return out;
}
