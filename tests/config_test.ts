import assert from "node:assert/strict";
import { ConfigError, FLOWS_PER_WORKER, parseServeArgs, type ServeConfig } from "../config.ts";
import { renderMetrics } from "../metrics.ts";
import { Stage } from "../stages/runtime.ts";

const parse = (args: string[], env: Record<string, string> = {}) =>
  parseServeArgs(args, env) as ServeConfig;

Deno.test("parseServeArgs()", async (t) => {
  await t.step("defaults: udp and tcp on 0.0.0.0:5060, RFC 3261 §10.3 expiry bounds", () => {
    const c = parse([]);
    assert.deepEqual(c.listen, [
      { transport: "udp", host: "0.0.0.0", port: 5060 },
      { transport: "tcp", host: "0.0.0.0", port: 5060 },
    ]);
    assert.equal(c.minExpires, 60);
    assert.equal(c.maxExpires, 7200);
    assert.equal(c.defaultExpires, 3600);
    assert.equal(c.store, "postgres");
    assert.equal(c.db, null);
    assert.equal(c.workers, navigator.hardwareConcurrency || 1);
  });

  await t.step("IPv6 listen addresses in brackets, repeatable flags", () => {
    const c = parse([
      "--listen",
      "udp:[::1]:5070",
      "--listen",
      "tcp:127.0.0.1:0",
      "--domain",
      "A.example",
    ]);
    assert.deepEqual(c.listen[0], { transport: "udp", host: "::1", port: 5070 });
    assert.deepEqual(c.listen[1], { transport: "tcp", host: "127.0.0.1", port: 0 });
    assert.deepEqual(c.domains, ["a.example"]);
  });

  await t.step("DATABASE_URL is used when --db is absent; workers default to the cores", () => {
    const c = parse(["--store", "postgres"], { DATABASE_URL: "postgres://x@127.0.0.1/db" });
    assert.equal(c.db, "postgres://x@127.0.0.1/db");
    assert.ok(c.workers >= 1);
    assert.equal(c.maxFlows, c.workers * FLOWS_PER_WORKER);
  });

  await t.step(
    "--max-flows beyond the cores' share adds workers (20,000 files per process)",
    () => {
      const c = parse(["--store", "memory", "--max-flows", "300000"]);
      assert.equal(
        c.workers,
        Math.ceil(300000 / FLOWS_PER_WORKER),
      );
      assert.ok(c.maxFlowsPerWorker <= FLOWS_PER_WORKER);
    },
  );

  for (
    const [args, fragment] of [
      [["--bogus"], "bogus"],
      [["--listen", "foo"], "--listen"],
      [["--listen", "udp:127.0.0.1:70000"], "--listen"],
      [["--min-expires", "abc"], "--min-expires"],
      [["--min-expires", "100", "--max-expires", "50"], "--min-expires"],
      [["--log-level", "loud"], "--log-level"],
      [["--db", "mysql://x"], "--db"],
      [["--store", "disk"], "--store"],
      [["--workers", "0", "--store", "memory"], "--workers"],
      [["--store", "memory", "--workers", "1", "--max-flows", "40000"], "--max-flows"],
      [["--digest-algorithms", "SHA-512"], "--digest-algorithms"],
    ] as const
  ) {
    await t.step(`rejects ${args.join(" ")} with one line naming the flag`, () => {
      assert.throws(() => parseServeArgs([...args], {}), (e: unknown) => {
        assert.ok(e instanceof ConfigError);
        assert.ok(e.message.includes(fragment), e.message);
        assert.ok(!e.message.includes("\n"), e.message);
        return true;
      });
    });
  }
});

Deno.test("renderMetrics() writes Prometheus text with per-stage histograms", () => {
  const stage = new Stage<number>({
    name: "registrar",
    capacity: 4,
    concurrency: 1,
    handler: () => {},
  });
  stage.offer(1);
  stage.drop("overload-503");
  const text = renderMetrics([{
    worker: 3,
    stages: [stage.snapshot()],
    flowsOpen: 7,
    responses: { "200": 1 },
  }]);
  assert.match(text, /^# TYPE citysip_stage_queue_wait_seconds histogram$/m);
  assert.match(
    text,
    /^citysip_stage_queue_wait_seconds_bucket\{stage="registrar",worker="3",le="\+Inf"\} 1$/m,
  );
  assert.match(text, /^citysip_stage_service_seconds_count\{stage="registrar",worker="3"\} 1$/m);
  assert.match(
    text,
    /^citysip_stage_dropped_total\{stage="registrar",worker="3",reason="overload-503"\} 1$/m,
  );
  assert.match(text, /^citysip_flows_open\{worker="3"\} 7$/m);
  assert.match(text, /^citysip_responses_total\{code="200",worker="3"\} 1$/m);
});
