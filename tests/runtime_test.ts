import assert from "node:assert/strict";
import { Histogram, LATENCY_BUCKETS, Stage } from "../stages/runtime.ts";

const tick = () => new Promise((r) => setTimeout(r, 5));

Deno.test("Stage (SEDA runtime)", async (t) => {
  await t.step("inline stage handles an item at once, on the caller's stack", () => {
    const seen: number[] = [];
    const stage = new Stage<number>({
      name: "s",
      capacity: 2,
      concurrency: 1,
      handler: (n) => {
        seen.push(n);
      },
    });
    assert.equal(stage.offer(1), true);
    assert.deepEqual(seen, [1]);
    assert.equal(stage.snapshot().completed, 1);
  });

  await t.step(
    "a full queue refuses and counts the drop as queue-full (bounded, never silent)",
    async () => {
      const release = Promise.withResolvers<void>();
      const stage = new Stage<number>({
        name: "s",
        capacity: 2,
        concurrency: 1,
        handler: () => release.promise,
      });
      assert.equal(stage.offer(1), true); // in service
      assert.equal(stage.offer(2), true); // queued
      assert.equal(stage.offer(3), true); // queued
      assert.equal(stage.offer(4), false); // full
      const snap = stage.snapshot();
      assert.equal(snap.arrivals, 4);
      assert.equal(snap.admitted, 3);
      assert.equal(snap.dropped["queue-full"], 1);
      assert.equal(snap.queueLength, 2);
      assert.equal(snap.inFlight, 1);
      release.resolve();
      await stage.idle();
      assert.equal(stage.snapshot().completed, 3);
    },
  );

  await t.step("deferred stage queues and drains from a later macrotask", async () => {
    const seen: number[] = [];
    const stage = new Stage<number>({
      name: "d",
      capacity: 10,
      concurrency: 10,
      mode: "deferred",
      handler: (n) => {
        seen.push(n);
      },
    });
    stage.offer(1);
    stage.offer(2);
    assert.deepEqual(seen, []);
    await tick();
    assert.deepEqual(seen, [1, 2]);
  });

  await t.step("urgent items are served before normal ones", async () => {
    const seen: string[] = [];
    const stage = new Stage<string>({
      name: "d",
      capacity: 10,
      concurrency: 1,
      mode: "deferred",
      handler: (s) => {
        seen.push(s);
      },
    });
    stage.offer("register-1");
    stage.offer("register-2");
    stage.offer("bye", true);
    await stage.idle();
    assert.deepEqual(seen, ["bye", "register-1", "register-2"]);
  });

  await t.step(
    "a throwing handler is counted as handler-error and reported; nothing escapes",
    async () => {
      const errors: unknown[] = [];
      const stage = new Stage<number>({
        name: "e",
        capacity: 4,
        concurrency: 2,
        onError: (e) => errors.push(e),
        handler: (n) => {
          if (n === 1) throw new Error("sync bug");
          return Promise.reject(new Error("async bug"));
        },
      });
      stage.offer(1);
      stage.offer(2);
      await stage.idle();
      assert.equal(stage.snapshot().dropped["handler-error"], 2);
      assert.equal(errors.length, 2);
    },
  );

  await t.step("queue delay follows the waiting items and fades once they are served", async () => {
    const release = Promise.withResolvers<void>();
    const stage = new Stage<number>({
      name: "q",
      capacity: 10,
      concurrency: 1,
      mode: "deferred",
      handler: () => release.promise,
    });
    stage.offer(1);
    stage.offer(2);
    await new Promise((r) => setTimeout(r, 60));
    assert.ok(stage.queueDelayMs() >= 50, `delay ${stage.queueDelayMs()}`);
    release.resolve();
    await stage.idle();
    await new Promise((r) => setTimeout(r, 600));
    assert.ok(stage.queueDelayMs() < 5, `delay after ${stage.queueDelayMs()}`);
  });
});

Deno.test("Histogram buckets and quantiles", () => {
  const h = new Histogram();
  for (let i = 0; i < 90; i++) h.observe(0.0004);
  for (let i = 0; i < 10; i++) h.observe(0.02);
  assert.equal(h.count, 100);
  assert.equal(h.counts[LATENCY_BUCKETS.indexOf(0.0005)], 90);
  assert.equal(h.counts[LATENCY_BUCKETS.indexOf(0.025)], 10);
  assert.ok(h.quantile(0.5) <= 0.0005 && h.quantile(0.5) > 0.00025);
  assert.ok(h.quantile(0.99) > 0.01 && h.quantile(0.99) <= 0.025);
  h.observe(100);
  assert.equal(h.counts[LATENCY_BUCKETS.length], 1);
});
