/**
 * One TCP flow sending far faster than it is served (issue 5, admission control at classify): the
 * flow keeps being read, its surplus REGISTERs (beyond its share of requests in service, or the
 * registrar's admission) are answered 503 + Retry-After (RFC 3261 §21.5.4),
 * the rest 200, none is lost, and a BYE sent behind the burst is answered at once (481, §15.1.2):
 * it does not wait behind the REGISTERs, as it would if the flow's reading paused.
 *
 * Against the real server process over a real socket; no timing is asserted.
 *
 * @module
 */
import assert from "node:assert/strict";
import { FLOW_MAX_IN_SERVICE } from "../transport/tcp.ts";
import { startServer } from "./_server.ts";
import { buildRegister, buildRequest, concat, type Response, TcpClient } from "./_client.ts";

/** Far more than one flow may have in service, all in one write. */
const BURST = 4 * FLOW_MAX_IN_SERVICE;

Deno.test("RFC 3261 §21.5.4: a TCP flow's surplus gets 503 + Retry-After, its BYE still passes (§15.1.2)", async () => {
  await using server = await startServer();
  const client = await TcpClient.connect(server.tcpPort);
  try {
    const sentBy = `127.0.0.1:${client.localPort}`;
    const registers: Uint8Array[] = [];
    for (let i = 0; i < BURST; i++) {
      registers.push(buildRegister({
        transport: "TCP",
        sentBy,
        user: `flow${i}`,
        callId: `burst-${i}@citysip.test`,
        contact: `<sip:flow${i}@${sentBy};transport=tcp>;expires=600`,
      }));
    }
    const bye = buildRequest({
      method: "BYE",
      transport: "TCP",
      sentBy,
      callId: "bye-behind-burst@citysip.test",
      headers: { To: "<sip:alice@citysip.test>;tag=nodialog" },
    });
    await client.send(concat(...registers, bye));

    const byCallId = new Map<string, Response>();
    while (byCallId.size < BURST + 1) {
      const r = await client.readResponse(20_000);
      const id = r.header("call-id") ?? "";
      assert.ok(!byCallId.has(id), `one final response per request (${id})`);
      byCallId.set(id, r);
    }

    const answered = byCallId.get("bye-behind-burst@citysip.test");
    assert.equal(answered?.status, 481, "the BYE is answered: no dialog (§15.1.2)");
    let ok = 0, refused = 0, byePosition = -1, position = 0;
    for (const [id, r] of byCallId) {
      if (id === "bye-behind-burst@citysip.test") {
        byePosition = position++;
        continue;
      }
      position++;
      if (r.status === 200) ok++;
      else {
        assert.equal(r.status, 503, `${id}: 200 or 503, got ${r.status}`);
        const retryAfter = Number(r.header("retry-after"));
        assert.ok(retryAfter >= 1, `${id}: 503 carries Retry-After (§21.5.4)`);
        refused++;
      }
    }
    console.log(
      `flow-overload: ${ok} x 200, ${refused} x 503 of ${BURST}; BYE answered as response #${
        byePosition + 1
      }`,
    );
    assert.equal(ok + refused, BURST, "every REGISTER answered");
    assert.ok(refused > 0, "the flow's surplus is refused, not queued without bound");
    assert.ok(ok > 0, "the flow's share is served");
    // The BYE came after every REGISTER on the wire; answered ahead of the admitted ones still in
    // service, it did not wait behind them (urgent lane, no paused reading).
    assert.ok(byePosition < BURST, "the BYE overtakes REGISTERs in service");
  } finally {
    await client.close();
  }
});
