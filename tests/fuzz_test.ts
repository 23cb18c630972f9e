/**
 * The fuzzer inside the test suite (issue 6): a seeded smoke run of the parser/framer mode, every
 * kept failing input replayed as a regression fixture, and a short network-mode run against the
 * real server. Reproduce or extend a run with `deno run -A fuzz/main.ts --seed S --seconds N`.
 */
import assert from "node:assert/strict";
import { checkInput, edgeLimits } from "../fuzz/check.ts";
import { statusOf, tcpRequest, UdpPeer, validRegister } from "../fuzz/client.ts";
import { loadCrashes } from "../fuzz/corpus.ts";
import { fuzzNetwork } from "../fuzz/network.ts";
import { fuzzParser } from "../fuzz/parser.ts";
import { Rng } from "../fuzz/prng.ts";
import { startServer } from "../fuzz/server.ts";

const SEED = 20261125;
const SMOKE_INPUTS = 100_000;

function b64(bytes: Uint8Array): string {
  let s = "";
  for (const b of bytes.subarray(0, 4096)) s += String.fromCharCode(b);
  return btoa(s);
}

Deno.test("fuzz: 100,000 seeded parser/framer inputs never throw, hang or grow memory (RFC 4475 §2)", () => {
  const stats = fuzzParser({
    seed: SEED,
    maxInputs: SMOKE_INPUTS,
    seconds: 120,
    slowMs: 50,
    maxRssMiB: 1024,
    save: Deno.env.get("FUZZ_SAVE") === "1",
  });
  const rate = stats.inputs / stats.seconds;
  console.log(
    `fuzz smoke: ${stats.inputs} inputs in ${stats.seconds.toFixed(1)} s (${
      rate.toFixed(0)
    }/s), slowest ${stats.slowestMs.toFixed(1)} ms, rss ${stats.rssStartMiB.toFixed(0)} -> ${
      stats.rssMaxMiB.toFixed(0)
    } MiB`,
  );
  const failures = [...stats.failures].map(([kind, f]) =>
    `${kind} x${f.count}: ${f.detail.split("\n")[0]}\n  input (base64): ${b64(f.example)}`
  );
  assert.deepEqual(failures, [], "rerun with FUZZ_SAVE=1 to keep the inputs as fixtures");
  assert.equal(stats.inputs, SMOKE_INPUTS, "the run ended early");
});

Deno.test("fuzz: every kept failing input passes now (tests/fixtures/fuzz/crashes/)", async (t) => {
  const crashes = loadCrashes();
  assert.ok(crashes.length > 0, "the crash store should hold the regressions found so far");
  for (const { name, bytes } of crashes) {
    await t.step(name, () => {
      // Several chunkings of the stream and framer limits, since framer failures depend on them.
      const limits = [undefined, 64, 65536, ...edgeLimits(bytes.length)];
      for (let seed = 0; seed < 16; seed++) {
        for (const max of limits) {
          const { failure } = checkInput(bytes, new Rng(seed), max);
          assert.equal(failure, null, `max ${max}: ${failure?.kind}: ${failure?.detail}`);
        }
      }
    });
  }
});

Deno.test({
  name:
    "fuzz: the server survives mutated messages over UDP and TCP, then registers (RFC 3261 §21.4.1)",
  sanitizeOps: false,
  sanitizeResources: false,
}, async () => {
  const server = await startServer();
  try {
    const stats = await fuzzNetwork({
      seed: SEED,
      targets: server.targets,
      maxMessages: 4000,
      batch: 500,
      seconds: 60,
      save: false,
      alive: server.alive,
    });
    console.log(
      `fuzz network: ${stats.sent} messages (udp ${stats.udpSent}, tcp ${stats.tcpSent}), ${stats.replies} replies, ${stats.checksOk}/${stats.batches} checks ok`,
    );
    assert.deepEqual(stats.failures, []);
    assert.equal(stats.sent, 4000);
    assert.ok(stats.udpSent > 1000 && stats.tcpSent > 1000);
    assert.ok(server.alive(), "server process exited");
    // And once more, explicitly: a valid REGISTER over each transport gets 200.
    const peer = await UdpPeer.open();
    try {
      const { text, callId } = validRegister("UDP", peer.port, "after-fuzz");
      const reply = await peer.request(text, server.udpPort, callId, 3000);
      assert.equal(statusOf(reply?.text), 200, reply?.text ?? "no UDP answer");
    } finally {
      await peer.close();
    }
    const tcp = await tcpRequest(server.tcpPort, validRegister("TCP", 5060, "after-fuzz-tcp").text);
    assert.equal(statusOf(tcp), 200, tcp ?? "no TCP answer");
    assert.doesNotMatch(server.log(), /level=error/, "no stage error was logged");
  } finally {
    await server.stop();
  }
});
