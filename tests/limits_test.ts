import assert from "node:assert/strict";
import {
  CONNECTION_RATE_DEFAULTS,
  connectionRateLimiter,
  REGISTER_RATE_DEFAULTS,
  registerRateLimiter,
  SourceRateLimiter,
} from "../stages/limits.ts";

Deno.test("SourceRateLimiter allows a burst, then the sustained rate (token bucket)", async (t) => {
  await t.step("a new source gets exactly `burst` events at once", () => {
    const l = new SourceRateLimiter({ ratePerSecond: 10, burst: 5, maxSources: 16 });
    const got = Array.from({ length: 8 }, () => l.allow("192.0.2.1", 1000));
    assert.deepEqual(got, [true, true, true, true, true, false, false, false]);
    assert.equal(l.allowed, 5);
    assert.equal(l.refused, 3);
  });

  await t.step("tokens refill at ratePerSecond, capped at burst", () => {
    const l = new SourceRateLimiter({ ratePerSecond: 10, burst: 5, maxSources: 16 });
    for (let i = 0; i < 5; i++) assert.ok(l.allow("a", 0));
    assert.equal(l.allow("a", 0), false);
    assert.equal(l.allow("a", 99), false, "0.99 token after 99 ms at 10/s");
    assert.equal(l.allow("a", 100), true, "one token after 100 ms");
    assert.equal(l.allow("a", 100), false);
    // A long quiet spell refills to burst, not beyond.
    let n = 0;
    while (l.allow("a", 3_600_000)) n++;
    assert.equal(n, 5);
  });

  await t.step("a sustained rate above the limit is held to the limit", () => {
    const l = new SourceRateLimiter({ ratePerSecond: 100, burst: 10, maxSources: 16 });
    let ok = 0;
    // 1,000 attempts per second for 10 s.
    for (let ms = 0; ms < 10_000; ms++) if (l.allow("198.51.100.9", ms)) ok++;
    assert.ok(ok >= 1000 && ok <= 1011, `allowed ${ok}, expected 100/s x 10 s + burst`);
  });

  await t.step("sources are independent", () => {
    const l = new SourceRateLimiter({ ratePerSecond: 1, burst: 1, maxSources: 16 });
    assert.ok(l.allow("192.0.2.1", 0));
    assert.equal(l.allow("192.0.2.1", 0), false);
    assert.ok(l.allow("192.0.2.2", 0), "another source is not affected");
    assert.ok(l.allow("2001:db8::1", 0));
  });

  await t.step("a clock that steps back refills nothing and never throws", () => {
    const l = new SourceRateLimiter({ ratePerSecond: 1000, burst: 1, maxSources: 4 });
    assert.ok(l.allow("a", 5000));
    assert.equal(l.allow("a", 1000), false);
    assert.equal(l.allow("a", 5000), false);
    assert.ok(l.allow("a", 5001));
  });

  await t.step("rate 0 allows the burst only, ever", () => {
    const l = new SourceRateLimiter({ ratePerSecond: 0, burst: 2, maxSources: 4 });
    assert.ok(l.allow("a", 0));
    assert.ok(l.allow("a", 1));
    assert.equal(l.allow("a", 1e12), false);
  });
});

Deno.test("SourceRateLimiter bounds its table and evicts the stalest source", async (t) => {
  await t.step("size never exceeds maxSources", () => {
    const l = new SourceRateLimiter({ ratePerSecond: 1, burst: 1, maxSources: 100 });
    for (let i = 0; i < 10_000; i++) l.allow(`10.0.${i >> 8}.${i & 255}`, i);
    assert.equal(l.size, 100);
    assert.equal(l.evicted, 9_900);
  });

  await t.step("the least recently seen source goes first; a recent one keeps its bucket", () => {
    const l = new SourceRateLimiter({ ratePerSecond: 0, burst: 1, maxSources: 3 });
    assert.ok(l.allow("a", 0));
    assert.ok(l.allow("b", 1));
    assert.ok(l.allow("c", 2));
    assert.equal(l.allow("a", 3), false, "touches a: b is now the stalest");
    assert.ok(l.allow("d", 4), "d evicts b");
    assert.equal(l.allow("a", 5), false, "a kept its empty bucket");
    assert.equal(l.allow("c", 6), false, "c kept its empty bucket");
    assert.equal(l.allow("d", 7), false);
    assert.ok(l.allow("b", 8), "b was forgotten: a fresh bucket (evicts a, the stalest)");
    assert.equal(l.evicted, 2);
    assert.ok(l.allow("a", 9), "a was evicted by b");
  });

  await t.step("a table of one keeps working", () => {
    const l = new SourceRateLimiter({ ratePerSecond: 0, burst: 1, maxSources: 1 });
    for (let i = 0; i < 10; i++) {
      assert.ok(l.allow(`s${i}`, i));
      assert.equal(l.allow(`s${i}`, i), false);
    }
    assert.equal(l.size, 1);
  });

  await t.step("the table stays consistent under random use (model check)", () => {
    const max = 8;
    const l = new SourceRateLimiter({ ratePerSecond: 0, burst: 2, maxSources: max });
    // Reference model: an array ordered by last use, with token counts.
    const model: { ip: string; tokens: number }[] = [];
    let seed = 12345;
    for (let step = 0; step < 20_000; step++) {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      const ip = `ip${seed % 13}`;
      let i = model.findIndex((e) => e.ip === ip);
      let expect: boolean;
      if (i < 0) {
        if (model.length === max) model.shift();
        model.push({ ip, tokens: 1 });
        expect = true;
      } else {
        const [e] = model.splice(i, 1);
        model.push(e!);
        i = model.length - 1;
        expect = e!.tokens >= 1;
        if (expect) e!.tokens--;
      }
      assert.equal(l.allow(ip, step), expect, `step ${step} ${ip}`);
      assert.equal(l.size, model.length);
    }
  });
});

Deno.test("SourceRateLimiter rejects bad options by name", () => {
  const ok = { ratePerSecond: 1, burst: 1, maxSources: 1 };
  assert.throws(() => new SourceRateLimiter({ ...ok, ratePerSecond: -1 }), /ratePerSecond/);
  assert.throws(() => new SourceRateLimiter({ ...ok, ratePerSecond: NaN }), /ratePerSecond/);
  assert.throws(() => new SourceRateLimiter({ ...ok, burst: 0.5 }), /burst/);
  assert.throws(() => new SourceRateLimiter({ ...ok, maxSources: 0 }), /maxSources/);
  assert.throws(() => new SourceRateLimiter({ ...ok, maxSources: 1.5 }), RangeError);
});

Deno.test("registerRateLimiter and connectionRateLimiter use their defaults, overridable", () => {
  const r = registerRateLimiter();
  let n = 0;
  while (r.allow("192.0.2.1", 0)) n++;
  assert.equal(n, REGISTER_RATE_DEFAULTS.burst);
  const c = connectionRateLimiter({ burst: 3 });
  n = 0;
  while (c.allow("192.0.2.1", 0)) n++;
  assert.equal(n, 3);
  assert.ok(CONNECTION_RATE_DEFAULTS.ratePerSecond > 0);
});

Deno.test("SourceRateLimiter.allow() costs about 100 ns or less (limits_bench.ts has the figures)", () => {
  const l = new SourceRateLimiter({ ratePerSecond: 50, burst: 200, maxSources: 4096 });
  const ips = Array.from({ length: 8192 }, (_, i) => `10.1.${i >> 8}.${i & 255}`);
  const run = () => {
    const t = performance.now();
    for (let k = 0; k < 1_000_000; k++) l.allow(ips[k & 8191]!, k);
    return (performance.now() - t) * 1e6 / 1_000_000;
  };
  run();
  const ns = Math.min(run(), run(), run());
  // Generous bound for a loaded CI machine; the bench measures the real figure.
  assert.ok(ns < 1000, `${ns.toFixed(0)} ns per call`);
});
