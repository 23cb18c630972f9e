/**
 * The bench works: `bench/main.ts --quick` runs every scenario against the targets that are
 * available and writes valid JSON with the summary keys of issue 7. Nothing about speed is
 * asserted. With env `CI=true`, Kamailio must be installed.
 */

import { kamailioAvailable } from "../bench/peer_kamailio.ts";

const SUMMARY_KEYS = [
  "flows_held_max",
  "kernel_bytes_per_flow",
  "user_bytes_per_flow",
  "register_per_s",
  "kamailio_register_per_s",
  "overload_goodput_ratio_at_3x",
  "capacity_one_worker_per_s",
  "p99_ms_at_80pct",
  "machine",
].sort();

const RATE_KEYS = [
  "udp_memory",
  "udp_postgres",
  "tcp_persistent_memory",
  "tcp_persistent_postgres",
  "tcp_with_open_memory",
  "tcp_per_transaction_memory",
].sort();

function assert(cond: unknown, msg: string): asserts cond {
  if (!cond) throw new Error(msg);
}

function assertNumberOrNull(v: unknown, where: string): void {
  assert(
    v === null || (typeof v === "number" && Number.isFinite(v)),
    `${where} is ${JSON.stringify(v)}`,
  );
}

Deno.test({
  name: "bench/main.ts --quick runs every scenario and writes the summary keys",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    if (Deno.env.get("CI") === "true") {
      const k = kamailioAvailable("memory");
      assert(k.ok, `Kamailio must be installed in CI: ${k.reason}`);
    }
    const out = await Deno.makeTempDir({ prefix: "citysip-bench-test-" });
    try {
      const main = new URL("../bench/main.ts", import.meta.url).pathname;
      const o = await new Deno.Command(Deno.execPath(), {
        args: ["run", "--allow-all", "--unstable-net", main, "--quick", "--out", out],
        stdout: "piped",
        stderr: "piped",
      }).output();
      const stderr = new TextDecoder().decode(o.stderr);
      assert(o.success, `bench exited with ${o.code}:\n${stderr.slice(-3000)}`);

      const files = [...Deno.readDirSync(out)].map((e) => e.name);
      const run = files.find((f) => /^\d{4}-.*\.json$/.test(f));
      assert(run, `no run file in ${files.join(", ")}`);
      const doc = JSON.parse(await Deno.readTextFile(`${out}/${run}`));
      for (const k of ["machine", "flags", "commit", "results", "summary"]) {
        assert(k in doc, `run file lacks "${k}"`);
      }
      for (const s of ["register", "overload", "conns", "stages", "peer", "sipp"]) {
        assert(s in doc.results, `run file lacks scenario "${s}"`);
      }

      const summary = JSON.parse(await Deno.readTextFile(`${out}/summary.quick.json`));
      assert(
        JSON.stringify(Object.keys(summary).sort()) === JSON.stringify(SUMMARY_KEYS),
        `summary keys: ${Object.keys(summary).join(", ")}`,
      );
      assert(
        JSON.stringify(doc.summary) === JSON.stringify(summary),
        "summary differs from the run file's",
      );
      for (const k of ["register_per_s", "kamailio_register_per_s"]) {
        assert(
          JSON.stringify(Object.keys(summary[k]).sort()) === JSON.stringify(RATE_KEYS),
          `${k} keys`,
        );
        for (const r of RATE_KEYS) assertNumberOrNull(summary[k][r], `${k}.${r}`);
      }
      for (const k of ["flows_held_max", "kernel_bytes_per_flow", "user_bytes_per_flow"]) {
        assertNumberOrNull(summary[k], k);
      }
      assertNumberOrNull(summary.overload_goodput_ratio_at_3x.udp, "overload udp");
      assertNumberOrNull(summary.overload_goodput_ratio_at_3x.tcp, "overload tcp");
      assertNumberOrNull(summary.capacity_one_worker_per_s.udp, "capacity udp");
      assertNumberOrNull(summary.capacity_one_worker_per_s.tcp, "capacity tcp");
      assertNumberOrNull(summary.p99_ms_at_80pct.udp_postgres, "p99 udp_postgres");
      assertNumberOrNull(
        summary.p99_ms_at_80pct.tcp_persistent_postgres,
        "p99 tcp_persistent_postgres",
      );
      for (const k of ["cpu_model", "cores", "kernel", "deno"]) {
        assert(k in summary.machine, `machine.${k}`);
      }
      if (kamailioAvailable("memory").ok) {
        assert(
          typeof summary.kamailio_register_per_s.udp_memory === "number",
          "Kamailio is installed but its UDP rate was not measured",
        );
      }
      for (
        const svg of [
          "memory_vs_connections.svg",
          "response_time_vs_rate.svg",
          "goodput_vs_offered.svg",
        ]
      ) {
        const text = await Deno.readTextFile(`${out}/quick-${svg}`);
        assert(text.startsWith("<svg") && text.trimEnd().endsWith("</svg>"), `${svg} is not SVG`);
      }
    } finally {
      await Deno.remove(out, { recursive: true }).catch(() => undefined);
    }
  },
});
