/**
 * Cost of one `SourceRateLimiter.allow()` call: the hot path (a known source), many sources in
 * turn, and churn (every call a new source, evicting the stalest).
 *
 * @module
 */

import { SourceRateLimiter } from "./limits.ts";

const ips = Array.from(
  { length: 100_000 },
  (_, i) => `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`,
);

const hot = new SourceRateLimiter({ ratePerSecond: 1e9, burst: 1e9, maxSources: 65536 });
let t = 0;
Deno.bench("allow(): one known source", { group: "limits", baseline: true }, () => {
  hot.allow("192.0.2.1", t++);
});

const many = new SourceRateLimiter({ ratePerSecond: 50, burst: 200, maxSources: 65536 });
let i = 0;
Deno.bench("allow(): 50,000 sources in turn", { group: "limits" }, () => {
  many.allow(ips[i]!, t++);
  if (++i === 50_000) i = 0;
});

const churn = new SourceRateLimiter({ ratePerSecond: 50, burst: 200, maxSources: 1024 });
let j = 0;
Deno.bench("allow(): a new source every call (evicts, table of 1,024)", { group: "limits" }, () => {
  churn.allow(ips[j]!, t++);
  if (++j === ips.length) j = 0;
});

const flood = new SourceRateLimiter({ ratePerSecond: 50, burst: 200, maxSources: 65536 });
Deno.bench("allow(): one source over its rate (refused)", { group: "limits" }, () => {
  flood.allow("198.51.100.7", 0);
});
