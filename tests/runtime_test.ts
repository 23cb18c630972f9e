import assert from "node:assert/strict";
import { Histogram, LATENCY_BUCKETS, Stage } from "../stages/runtime.ts";

const tick = () => new Promise((r) => setTimeout(r, 5));

/** A deferred stage whose items take 0.5 ms of work each (2,000 items/s), `budgetMs` a turn. */
function slowStage(
  budgetMs: number,
  more: {
    targetMs?: number;
    deadlineMs?: number;
    onLate?: (item: number, waited: number) => void;
    onItem?: (item: number) => void;
  } = {},
): Stage<number> {
  const { onItem, ...options } = more;
  return new Stage<number>({
    name: "q",
    capacity: 100_000,
    concurrency: 1,
    mode: "deferred",
    budgetMs,
    ...options,
    handler: (item) => {
      onItem?.(item);
      const until = performance.now() + 0.5;
      while (performance.now() < until) { /* busy */ }
    },
  });
}

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

  await t.step("queue delay: a stuck stage's head age counts; none once served", async () => {
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
    await new Promise((r) => setTimeout(r, 30));
    // Item 1 was taken at once, item 2 waits a moment behind it.
    assert.ok(stage.queueDelayMs() < 5, `delay while item 1 is served ${stage.queueDelayMs()}`);
    await new Promise((r) => setTimeout(r, 250));
    // Nothing taken for longer than STUCK_MS: the head's age counts.
    assert.ok(stage.queueDelayMs() >= 250, `delay when stuck ${stage.queueDelayMs()}`);
    release.resolve();
    await stage.idle();
    assert.equal(stage.queueDelayMs(), 0, "nothing waits");
  });

  await t.step(
    "standing queue (CoDel): a burst behind a pause is served, sustained overload is standing and sheds late items, urgent ones are served",
    async () => {
      const late: number[] = [];
      const served: number[] = [];
      const stage = slowStage(2, {
        targetMs: 10,
        deadlineMs: 30,
        onLate: (_item, waited) => late.push(waited),
        onItem: (item) => served.push(item),
      });
      // A burst of 60 items (30 ms of work) behind a 40 ms stall: they wait up to ~70 ms, but the
      // queue drains within the 100 ms interval: not standing, nothing shed.
      for (let i = 0; i < 60; i++) stage.offer(i);
      const stall = performance.now() + 40;
      while (performance.now() < stall) { /* the event loop is busy elsewhere */ }
      await stage.idle();
      assert.equal(late.length, 0, `shed after a mere pause: ${late.length}`);
      assert.equal(served.length, 60);
      assert.equal(stage.standing, false);
      // 4,000 items/s offered against 2,000/s for 400 ms: every item taken waits longer than the
      // target for more than 100 ms: standing, and items that waited past 30 ms go to onLate.
      let sawStanding = false;
      for (let k = 0; k < 40; k++) {
        for (let i = 0; i < 40; i++) stage.offer(1000 + i);
        if (k === 30) stage.offer(-1, true); // urgent (a BYE, say): never late
        await new Promise((r) => setTimeout(r, 10));
        sawStanding ||= stage.standing;
      }
      assert.ok(sawStanding, "sustained overload is standing");
      assert.ok(late.length > 0, "late items were shed");
      assert.ok(late.every((w) => w > 30), `shed before the deadline: ${Math.min(...late)}`);
      assert.ok(served.includes(-1), "the urgent item was served");
      assert.equal(stage.snapshot().dropped["late"], late.length);
      await stage.idle();
      assert.equal(stage.standing, false, "an empty queue is not standing");
    },
  );

  await t.step(
    "queue delay: a burst after a pause is absorbed, a growing queue is seen at once",
    async () => {
      const stage = slowStage(1);
      // Light load: items are taken as they come.
      for (let i = 0; i < 10; i++) {
        stage.offer(i);
        await new Promise((r) => setTimeout(r, 5));
      }
      // A burst: 40 items (20 ms of work) arrive at once, and the loop then stalls 40 ms.
      for (let i = 0; i < 40; i++) stage.offer(i);
      const stall = performance.now() + 40;
      while (performance.now() < stall) { /* the event loop is busy elsewhere */ }
      const head = stage.headAgeMs();
      assert.ok(head >= 40, `the head waited through the stall ${head}`);
      assert.ok(stage.queueDelayMs() < 25, `20 ms of work is not 40 ms ${stage.queueDelayMs()}`);
      await stage.idle();
      // 4,000 items/s offered against 2,000/s served: the predicted delay follows the queue's growth
      // (about 10 ms more per 10 ms), not the head's age, which lags by the delay itself.
      const seen: { predicted: number; head: number; work: number }[] = [];
      for (let k = 0; k < 30; k++) {
        for (let i = 0; i < 40; i++) stage.offer(i);
        await new Promise((r) => setTimeout(r, 10));
        seen.push({
          predicted: stage.queueDelayMs(),
          head: stage.headAgeMs(),
          work: stage.queueLength * 0.5,
        });
      }
      const last = seen[seen.length - 1]!;
      assert.ok(
        last.predicted > 0.5 * last.work,
        `predicted ${last.predicted} for ${last.work} ms of work`,
      );
      assert.ok(last.predicted > last.head, `ahead of the head's age (${last.head})`);
      await stage.idle();
    },
  );
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
