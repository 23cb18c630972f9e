/**
 * The header-count limit of the parser (issue 6 item 3, "header count"): `MAX_HEADERS` header lines
 * at most, folded continuation lines included; one more is a 400 "Too Many Headers" (RFC 3261 §21.4.1
 * 400 Bad Request), from `parseMessage` and from a running server over UDP.
 */
import assert from "node:assert/strict";
import { MAX_HEADERS, parseMessage } from "../sip/parse.ts";
import { buildRequest, UdpClient } from "./_client.ts";
import { startServer } from "./_server.ts";

const enc = new TextEncoder();

/** Mandatory REGISTER headers (RFC 3261 §8.1.1): 6 lines with Max-Forwards, plus Content-Length. */
const BASE = [
  "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-limits",
  "Max-Forwards: 70",
  "From: <sip:alice@example.com>;tag=1",
  "To: <sip:alice@example.com>",
  "Call-ID: limits@192.0.2.1",
  "CSeq: 1 REGISTER",
];

/** A REGISTER with exactly `total` header lines: BASE, fillers, Content-Length last. */
function withHeaderLines(total: number, filler = (i: number) => `X-Filler-${i}: ${i}`): string {
  const fillers = Array.from({ length: total - BASE.length - 1 }, (_, i) => filler(i));
  return ["REGISTER sip:example.com SIP/2.0", ...BASE, ...fillers, "Content-Length: 0", "", ""]
    .join("\r\n");
}

Deno.test("issue 6 item 3: MAX_HEADERS header lines parse, one more is 400 Too Many Headers", async (t) => {
  await t.step("the default is 256", () => {
    assert.equal(MAX_HEADERS, 256);
  });

  await t.step("exactly MAX_HEADERS lines: accepted, every field kept", () => {
    const r = parseMessage(enc.encode(withHeaderLines(MAX_HEADERS)));
    assert.ok(r.ok, JSON.stringify(r));
    assert.equal(r.value.headers.length, MAX_HEADERS);
  });

  await t.step("MAX_HEADERS + 1 lines: 400 Too Many Headers", () => {
    const r = parseMessage(enc.encode(withHeaderLines(MAX_HEADERS + 1)));
    assert.equal(r.ok, false);
    if (r.ok) return;
    assert.equal(r.status, 400);
    assert.equal(r.reason, "Too Many Headers");
  });

  await t.step("the limit holds for responses too (RFC 3261 §7.2: same header grammar)", () => {
    const lines = withHeaderLines(MAX_HEADERS + 1).split("\r\n");
    lines[0] = "SIP/2.0 200 OK";
    const r = parseMessage(enc.encode(lines.join("\r\n")));
    assert.equal(r.ok, false);
    if (!r.ok) assert.equal(r.reason, "Too Many Headers");
  });

  await t.step("folded continuation lines (RFC 3261 §7.3.1) count as lines", () => {
    // MAX_HEADERS fields would be fine, but each filler is folded over two lines.
    const folded = withHeaderLines(MAX_HEADERS / 2 + 8, (i) => `X-Fold-${i}: a\r\n b`);
    const r = parseMessage(enc.encode(folded));
    assert.equal(r.ok, false);
    if (!r.ok) assert.equal(r.reason, "Too Many Headers");
    // The same message with fewer folded fillers is accepted and the folds are joined.
    const fewer = parseMessage(enc.encode(withHeaderLines(20, (i) => `X-Fold-${i}: a\r\n b`)));
    assert.ok(fewer.ok, JSON.stringify(fewer));
    assert.equal(fewer.value.headers.find((h) => h.name === "x-fold-0")?.value, "a b");
  });

  await t.step("compact forms and repeated Via lines count like any other line", () => {
    const r = parseMessage(
      enc.encode(
        withHeaderLines(
          MAX_HEADERS + 1,
          (i) => `v: SIP/2.0/UDP 192.0.2.${i % 250}:5060;branch=z9hG4bK${i}`,
        ),
      ),
    );
    assert.equal(r.ok, false);
    if (!r.ok) assert.equal(r.reason, "Too Many Headers");
  });

  await t.step("the limit is a parameter: maxHeaders 10", () => {
    assert.ok(parseMessage(enc.encode(withHeaderLines(10)), 10).ok);
    const r = parseMessage(enc.encode(withHeaderLines(11)), 10);
    assert.equal(r.ok, false);
    if (!r.ok) assert.equal(r.reason, "Too Many Headers");
  });

  await t.step("a 64 KiB datagram of one-byte headers is refused fast (slowloris of lines)", () => {
    const tiny = withHeaderLines(9000, (i) => `a${i % 10}:`);
    assert.ok(tiny.length < 65536, `${tiny.length}`);
    const bytes = enc.encode(tiny);
    const start = performance.now();
    for (let i = 0; i < 100; i++) {
      const r = parseMessage(bytes);
      assert.equal(r.ok, false);
    }
    const perMessageUs = (performance.now() - start) * 10;
    // Generous: the parse stops at line 257, a few tens of µs; a full parse of 9000 lines is more.
    assert.ok(perMessageUs < 2000, `${perMessageUs.toFixed(1)} µs per message`);
  });
});

Deno.test({
  name: "issue 6 item 3: the server answers 400 Too Many Headers over UDP (RFC 3261 §21.4.1)",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    const server = await startServer();
    const client = new UdpClient();
    try {
      const fillers: Record<string, string> = {};
      for (let i = 0; i < MAX_HEADERS; i++) fillers[`X-Filler-${i}`] = String(i);
      const res = await client.request(
        buildRequest({ user: "toomany", headers: fillers }),
        server.udpPort,
      );
      assert.equal(res.status, 400);
      assert.equal(res.reason, "Too Many Headers");
      // And the server still registers a normal request afterwards.
      const ok = await client.request(
        buildRequest({ user: "toomany", contacts: ["<sip:toomany@127.0.0.1:5999>"], expires: 60 }),
        server.udpPort,
      );
      assert.equal(ok.status, 200);
    } finally {
      await client.close();
      await server.stop();
    }
  },
});
