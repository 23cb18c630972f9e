/**
 * Conformance of the running server over UDP with the classes of message in RFC 4475 (SIP torture
 * tests) and RFC 5118 (IPv6 torture tests) that a registrar meets. The messages are our own, each
 * modelled on the RFC message named in its test; what we check is the server's answer: valid but odd
 * messages are parsed and answered as usual, invalid ones get 400, an unknown SIP version 505, an
 * unsupported Request-URI scheme 416, an unknown required extension 420 with Unsupported, and
 * responses (odd or broken) are dropped without an answer.
 *
 * It also checks that the server never amplifies over UDP and answers only the packet's source
 * address (RFC 3581, RFC 3261 §18.2.2), whatever the Via says.
 *
 * Not modelled, with the reason:
 * - RFC 4475 §3.1.2.11 (escruri), §3.1.2.14 (badaspec): the RFC leaves a registrar's answer open.
 * - RFC 4475 §3.1.2.12 (baddate): a registrar does not read Date.
 * - RFC 4475 §3.3.6 (invut), §3.3.15 (sdp01), RFC 5118 §4.6, §4.8: about bodies/SDP of INVITEs,
 *   which a registrar answers 405 without reading.
 * - RFC 4475 §3.3.7 (regaut01): needs `--auth`, hence the PostgreSQL store (auth_e2e_test.ts).
 */
import assert from "node:assert/strict";
import { type Datagram, statusOf, UdpPeer } from "../fuzz/client.ts";
import { type ServerProcess, startServer } from "../fuzz/server.ts";

/** No-amplification rule for a UDP response to a request that was not a success: at most twice the
 * request plus 256 bytes (status line, To tag, Content-Length and one short added header). */
function maxErrorResponse(requestBytes: number): number {
  return 2 * requestBytes + 256;
}

/** How long "no answer" waits. */
const SILENCE_MS = 400;

interface Exchange {
  readonly name: string;
  readonly request: number;
  readonly status: number;
  readonly response: number;
}

let seq = 0;

/** Fills `{{port}}` (our UDP port) and `{{id}}` (unique per message) into CRLF-joined lines. */
function build(lines: readonly string[], port: number, body = ""): { text: string; id: string } {
  const id = `c${Date.now().toString(36)}x${(seq++).toString(36)}`;
  const text = (lines.join("\r\n") + "\r\n\r\n" + body)
    .replaceAll("{{port}}", String(port))
    .replaceAll("{{id}}", id);
  return { text, id };
}

/** A REGISTER with the usual headers; `replace` swaps (or with null, removes) a header by name;
 * `extra` adds lines before Content-Length. */
function register(
  opts: {
    method?: string;
    uri?: string;
    version?: string;
    user?: string;
    replace?: Record<string, string | null>;
    extra?: readonly string[];
  } = {},
): string[] {
  const method = opts.method ?? "REGISTER";
  const user = opts.user ?? "u{{id}}";
  const headers: [string, string][] = [
    ["Via", "SIP/2.0/UDP 127.0.0.1:{{port}};branch=z9hG4bK-{{id}};rport"],
    ["Max-Forwards", "70"],
    ["To", `<sip:${user}@example.com>`],
    ["From", `<sip:${user}@example.com>;tag={{id}}`],
    ["Call-ID", "{{id}}@127.0.0.1"],
    ["CSeq", `1 ${method}`],
    ["Contact", `<sip:${user}@127.0.0.1:{{port}}>`],
  ];
  const lines = [`${method} ${opts.uri ?? "sip:example.com"} ${opts.version ?? "SIP/2.0"}`];
  for (const [name, value] of headers) {
    const r = opts.replace?.[name];
    if (r === null) continue;
    lines.push(`${name}: ${r ?? value}`);
  }
  lines.push(...(opts.extra ?? []), "Content-Length: 0");
  return lines;
}

function headerOf(text: string, name: string): string | undefined {
  const m = new RegExp(`^${name}[ \\t]*:[ \\t]*(.*)$`, "im").exec(text);
  return m?.[1]?.trim();
}

Deno.test({
  name: "conformance: RFC 4475 / RFC 5118 message classes against the real server over UDP",
  sanitizeOps: false,
  sanitizeResources: false,
}, async (t) => {
  const server: ServerProcess = await startServer();
  const peer = await UdpPeer.open();
  const exchanges: Exchange[] = [];
  try {
    /** Sends one message; returns the reply (matched by its unique id) or null after a wait. */
    const send = async (
      name: string,
      lines: readonly string[],
      body = "",
    ): Promise<Datagram | null> => {
      const { text, id } = build(lines, peer.port, body);
      const reply = await peer.request(text, server.udpPort, id, 2000);
      if (reply !== null) {
        assert.equal(reply.address, "127.0.0.1");
        assert.equal(reply.port, server.udpPort, "answers come from the port we sent to");
        exchanges.push({
          name,
          request: new TextEncoder().encode(text).length,
          status: statusOf(reply.text),
          response: reply.bytes.length,
        });
      }
      return reply;
    };
    /** Sends and asserts the status code. */
    const expectStatus = async (
      name: string,
      status: number,
      lines: readonly string[],
      body = "",
    ): Promise<string> => {
      const reply = await send(name, lines, body);
      assert.ok(reply !== null, `no answer; expected ${status}`);
      assert.equal(statusOf(reply.text), status, reply.text.split("\r\n")[0]);
      return reply.text;
    };
    /** Sends and asserts that nothing at all comes back. */
    const expectSilence = async (lines: readonly string[], raw?: string): Promise<void> => {
      const from = peer.received.length;
      const text = raw ?? build(lines, peer.port).text;
      await peer.send(text, server.udpPort);
      const got = await peer.waitFor(() => true, SILENCE_MS, from);
      assert.equal(got, null, `unexpected answer: ${got?.text.split("\r\n")[0]}`);
    };
    const step = (name: string, fn: () => Promise<unknown>) =>
      t.step(name, async () => {
        await fn();
      });

    // --- RFC 4475 §3.1.1: valid messages that must parse --------------------------------------
    await step(
      "RFC 4475 §3.1.1.1 (wsinv): odd whitespace, folding and case are answered 200",
      () =>
        expectStatus("wsinv", 200, [
          "REGISTER sip:example.com SIP/2.0",
          "Via  : SIP  /   2.0",
          " /UDP",
          "    127.0.0.1:{{port}};rport ;  branch = z9hG4bK-{{id}}",
          "TO :",
          " <sip:ws{{id}}@example.com>",
          "from   : <sip:ws{{id}}@example.com>",
          "  ;tag = {{id}}",
          "Max-Forwards: 0068",
          "Call-ID: {{id}}@127.0.0.1",
          "cseq: 0009",
          "  REGISTER",
          "Contact:",
          "\t<sip:ws{{id}}@127.0.0.1:{{port}}>",
          "NewFangledHeader:   newfangled value",
          " continued newfangled value",
          "l: 0",
        ]),
    );
    await step(
      "RFC 4475 §3.1.1.2 (intmeth): a method of odd token characters gets 501",
      () =>
        expectStatus(
          "intmeth",
          501,
          register({ method: "!interesting-Method0123456789_*+`.%indeed'~" }),
        ),
    );
    await step(
      "RFC 4475 §3.1.1.3 (esc01): %-escapes in To and Contact users register (200)",
      () => expectStatus("esc01", 200, register({ user: "sips%3Auser%40{{id}}" })),
    );
    await step(
      "RFC 4475 §3.1.1.4 (escnull): escaped NULs in user parts register (200)",
      () => expectStatus("escnull", 200, register({ user: "null-%00-{{id}}" })),
    );
    await step(
      "RFC 4475 §3.1.1.5 (esc02): RE%47IST%45R is another method (501), not REGISTER",
      () => expectStatus("esc02", 501, register({ method: "RE%47IST%45R" })),
    );
    await step(
      "RFC 4475 §3.1.1.6 (lwsdisp): no LWS between display name and < (200)",
      () =>
        expectStatus(
          "lwsdisp",
          200,
          register({ replace: { To: "caller<sip:ld{{id}}@example.com>" } }),
        ),
    );
    await step(
      "RFC 4475 §3.1.1.7 (longreq): very long header values and tokens (200)",
      () =>
        expectStatus(
          "longreq",
          200,
          register({
            user: "l{{id}}" + "x".repeat(200),
            replace: {
              From: `"${"Long ".repeat(60)}" <sip:l{{id}}@example.com>;tag={{id}}${
                "t".repeat(300)
              }`,
            },
            extra: [
              `X-Long: ${"a".repeat(3000)}`,
              `Via: SIP/2.0/UDP ${"h".repeat(250)}.example.com;branch=z9hG4bK${"b".repeat(200)}`,
            ],
          }),
        ),
    );
    await step(
      "RFC 4475 §3.1.1.8 (dblreq): octets after Content-Length are ignored (200)",
      async () => {
        const first = register();
        const { text, id } = build(first, peer.port);
        const tail = build(register({ method: "INVITE" }), peer.port).text;
        const reply = await peer.request(text + tail, server.udpPort, id);
        assert.equal(statusOf(reply?.text), 200);
      },
    );
    await step(
      "RFC 4475 §3.1.1.9 (semiuri): ; and escapes in the Request-URI user part (200, OPTIONS)",
      () =>
        expectStatus(
          "semiuri",
          200,
          register({ method: "OPTIONS", uri: "sip:user;par=u%40example.net@example.com" }),
        ),
    );
    await step(
      "RFC 4475 §3.1.1.10 (transports): unknown Via transports (200, OPTIONS)",
      () =>
        expectStatus(
          "transports",
          200,
          register({
            method: "OPTIONS",
            extra: [
              "Via: SIP/2.0/SCTP t1.example.com;branch=z9hG4bKkdjuw",
              "Via: SIP/2.0/TLS t2.example.com;branch=z9hG4bKklasjdhf",
              "Via: SIP/2.0/UNKNOWN t3.example.com;branch=z9hG4bKasdd",
            ],
          }),
        ),
    );
    await step(
      "RFC 4475 §3.1.1.11 (mpart01): a multipart body is carried by Content-Length (200, OPTIONS)",
      () => {
        const body = "--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b1--\r\n";
        const lines = register({ method: "OPTIONS", replace: {} }).slice(0, -1);
        lines.push('Content-Type: multipart/mixed;boundary="b1"', `Content-Length: ${body.length}`);
        return expectStatus("mpart01", 200, lines, body);
      },
    );
    await step(
      "RFC 4475 §3.1.1.12 (unreason): a response with an odd reason phrase is dropped",
      () =>
        expectSilence([
          "SIP/2.0 200 = 2**3 * 5**2 \u00d0\u00bd\u00d0\u00be",
          "Via: SIP/2.0/UDP 127.0.0.1:{{port}};branch=z9hG4bK-{{id}}",
          "Call-ID: {{id}}",
          "CSeq: 1 REGISTER",
          "From: <sip:a@example.com>;tag=1",
          "To: <sip:a@example.com>;tag=2",
          "Content-Length: 0",
        ]),
    );
    await step(
      "RFC 4475 §3.1.1.13 (noreason): a response with no reason phrase is dropped",
      () =>
        expectSilence([
          "SIP/2.0 100 ",
          "Via: SIP/2.0/UDP 127.0.0.1:{{port}};branch=z9hG4bK-{{id}}",
          "Call-ID: {{id}}",
          "CSeq: 1 REGISTER",
          "From: <sip:a@example.com>;tag=1",
          "To: <sip:a@example.com>",
          "Content-Length: 0",
        ]),
    );

    // --- RFC 4475 §3.1.2: invalid messages ------------------------------------------------------
    await step(
      "RFC 4475 §3.1.2.1 (badinv01): empty header parameters (;;) get 400",
      () =>
        expectStatus(
          "badinv01",
          400,
          register({ replace: { To: "<sip:b{{id}}@example.com>;;tag=x" } }),
        ),
    );
    await step(
      "RFC 4475 §3.1.2.2 (clerr): Content-Length beyond the datagram gets 400",
      () =>
        expectStatus("clerr", 400, [...register().slice(0, -1), "Content-Length: 9999"], "v=0\r\n"),
    );
    await step(
      "RFC 4475 §3.1.2.3 (scalar02): a negative Content-Length gets 400",
      () => expectStatus("scalar02", 400, [...register().slice(0, -1), "Content-Length: -999"]),
    );
    await step(
      "RFC 4475 §3.1.2.4 (scalarlg): an overlarge CSeq gets 400",
      () =>
        expectStatus(
          "scalarlg",
          400,
          register({ replace: { CSeq: "36893488147419103232 REGISTER" } }),
        ),
    );
    await step(
      "RFC 4475 §3.1.2.4 (scalarlg): an overlarge Expires gets 400 or is capped, never 5xx",
      async () => {
        const text = await expectStatus(
          "scalarlg-expires",
          200,
          register({ extra: ["Expires: 10000000000000000000"] }),
        );
        const contact = headerOf(text, "Contact") ?? "";
        const expires = Number(/expires=(\d+)/.exec(contact)?.[1]);
        assert.ok(expires > 0 && expires <= 7200, `capped at --max-expires, got ${contact}`);
      },
    );
    await step(
      "RFC 4475 §3.1.2.5 (scalarlg response): a response with status 4294967301 is dropped",
      () =>
        expectSilence([
          "SIP/2.0 4294967301 better not break the receiver",
          "Via: SIP/2.0/UDP 127.0.0.1:{{port}};branch=z9hG4bK-{{id}}",
          "Call-ID: {{id}}",
          "CSeq: 1 REGISTER",
          "From: <sip:a@example.com>;tag=1",
          "To: <sip:a@example.com>",
          "Content-Length: 0",
        ]),
    );
    await step(
      "RFC 4475 §3.1.2.6 (quotbal): an unterminated quoted display name gets 400",
      () =>
        expectStatus(
          "quotbal",
          400,
          register({ replace: { To: '"Mr. J. User <sip:q{{id}}@example.com>' } }),
        ),
    );
    await step(
      "RFC 4475 §3.1.2.7 (ltgtruri): a Request-URI in <> gets 400",
      () => expectStatus("ltgtruri", 400, register({ uri: "<sip:example.com>" })),
    );
    await step(
      "RFC 4475 §3.1.2.8 (lwsruri): LWS inside the Request-URI gets 400",
      () => expectStatus("lwsruri", 400, register({ uri: "sip:user@example.com; lr" })),
    );
    await step(
      "RFC 4475 §3.1.2.9 (lwsstart): several SPs between Request-Line elements get 400",
      () =>
        expectStatus("lwsstart", 400, [
          "REGISTER  sip:example.com  SIP/2.0",
          ...register().slice(1),
        ]),
    );
    await step(
      "RFC 4475 §3.1.2.10 (trws): trailing SP after the Request-Line gets 400",
      () =>
        expectStatus("trws", 400, ["REGISTER sip:example.com SIP/2.0 ", ...register().slice(1)]),
    );
    await step(
      "RFC 4475 §3.1.2.13 (regbadct): an addr-spec Contact with URI headers, not in <>, gets 400",
      () =>
        expectStatus(
          "regbadct",
          400,
          register({
            replace: { Contact: "sip:user@example.com?Route=%3Csip:sip.example.com%3E" },
          }),
        ),
    );
    await step(
      "RFC 4475 §3.1.2.15 (baddn): an unquoted display name with non-token characters in To gets 400",
      () =>
        expectStatus(
          "baddn",
          400,
          register({ replace: { To: "Bell, Alexander <sip:b{{id}}@example.com>" } }),
        ),
    );
    // §20.20: From is decoded like To, and a malformed one gets 400.
    await step(
      "RFC 4475 §3.1.2.15 (baddn): an unquoted display name with non-token characters in From gets 400",
      () =>
        expectStatus(
          "baddn-from",
          400,
          register({ replace: { From: "Bell, Alexander <sip:a.g.bell@example.com>;tag={{id}}" } }),
        ),
    );
    await step(
      "RFC 4475 §3.1.2.16 (badvers): SIP/7.0 gets 505",
      () => expectStatus("badvers", 505, register({ version: "SIP/7.0" })),
    );
    await step(
      "RFC 4475 §3.1.2.17 (mismatch01): a CSeq method differing from the request gets 400",
      () => expectStatus("mismatch01", 400, register({ replace: { CSeq: "1 INVITE" } })),
    );
    await step(
      "RFC 4475 §3.1.2.18 (mismatch02): an unknown method with a mismatched CSeq gets 400, not 501",
      () =>
        expectStatus(
          "mismatch02",
          400,
          register({ method: "NEWMETHOD", replace: { CSeq: "1 INVITE" } }),
        ),
    );
    await step(
      "RFC 4475 §3.1.2.19 (bigcode): a response with status 4294967301 ... 70000 is dropped",
      () =>
        expectSilence([
          "SIP/2.0 70000 Ok",
          "Via: SIP/2.0/UDP 127.0.0.1:{{port}};branch=z9hG4bK-{{id}}",
          "Call-ID: {{id}}",
          "CSeq: 1 REGISTER",
          "From: <sip:a@example.com>;tag=1",
          "To: <sip:a@example.com>",
          "Content-Length: 0",
        ]),
    );

    // --- RFC 4475 §3.2-3.4: transaction and application layer ---------------------------------
    await step(
      "RFC 4475 §3.2.1 (badbranch): a branch without the magic cookie still registers (200)",
      () =>
        expectStatus(
          "badbranch",
          200,
          register({ replace: { Via: "SIP/2.0/UDP 127.0.0.1:{{port}};branch=z9hG4bK;rport" } }),
        ),
    );
    await step(
      "RFC 4475 §3.3.1 (insuf): missing Call-ID gets 400",
      () =>
        expectStatus(
          "insuf",
          400,
          register({ replace: { "Call-ID": null }, extra: ["X-Id: {{id}}"] }),
        ),
    );
    await step(
      "RFC 4475 §3.3.1 (insuf): missing From gets 400",
      () => expectStatus("insuf-from", 400, register({ replace: { From: null } })),
    );
    await step(
      "RFC 4475 §3.3.2 (unkscm): an unknown Request-URI scheme gets 416",
      () => expectStatus("unkscm", 416, register({ uri: "nobodyknowsthisscheme:totallyopaque" })),
    );
    await step(
      "RFC 4475 §3.3.3 (novelsc): a known but atypical Request-URI scheme gets 416",
      () => expectStatus("novelsc", 416, register({ uri: "soap.beep://192.0.2.103:3002" })),
    );
    await step(
      "RFC 4475 §3.3.4 (unksm2): a REGISTER with an unknown scheme in To gets 416",
      () =>
        expectStatus(
          "unksm2",
          416,
          register({ replace: { To: "isbn:2983792873", Contact: "<name:John_Smith>" } }),
        ),
    );
    await step(
      "RFC 4475 §3.3.5 (bext01): REGISTER with Require: unknownext gets 420 with Unsupported",
      async () => {
        const text = await expectStatus(
          "bext01",
          420,
          register({ extra: ["Require: unknownext, newfeature1", "Proxy-Require: foo"] }),
        );
        const unsupported = headerOf(text, "Unsupported") ?? "";
        for (const tag of ["unknownext", "newfeature1", "foo"]) {
          assert.ok(unsupported.toLowerCase().includes(tag), `Unsupported: ${unsupported}`);
        }
      },
    );
    await step(
      "RFC 4475 §3.3.5 (bext01): OPTIONS with Require: newfeature1 gets 420 (RFC 3261 §8.2.2.3)",
      () =>
        expectStatus(
          "bext01-options",
          420,
          register({ method: "OPTIONS", extra: ["Require: newfeature1"] }),
        ),
    );
    await step(
      "RFC 4475 §3.3.8 (multi01): two To header lines get 400",
      () => expectStatus("multi01", 400, register({ extra: ["To: <sip:other@example.com>"] })),
    );
    await step(
      "RFC 4475 §3.3.8 (multi01): two CSeq header lines get 400",
      () => expectStatus("multi01-cseq", 400, register({ extra: ["CSeq: 2 REGISTER"] })),
    );
    await step(
      "RFC 4475 §3.3.9 (mcl01): conflicting Content-Length values get 400",
      () => expectStatus("mcl01", 400, [...register(), "l: 7"]),
    );
    await step(
      "RFC 4475 §3.3.10 (bcast): a 200 OK with a broadcast Via is dropped",
      () =>
        expectSilence([
          "SIP/2.0 200 OK",
          "Via: SIP/2.0/UDP 192.0.2.255:5060;branch=z9hG4bK-{{id}};received=255.255.255.255",
          "Via: SIP/2.0/UDP 127.0.0.1:{{port}};branch=z9hG4bK-{{id}}x",
          "Call-ID: {{id}}",
          "CSeq: 1 OPTIONS",
          "From: <sip:a@example.com>;tag=1",
          "To: <sip:a@example.com>;tag=2",
          "Content-Length: 0",
        ]),
    );
    await step(
      "RFC 4475 §3.3.11 (zeromf): OPTIONS to us with Max-Forwards: 0 is answered (200)",
      () =>
        expectStatus(
          "zeromf",
          200,
          register({ method: "OPTIONS", replace: { "Max-Forwards": "0" } }),
        ),
    );
    await step("RFC 4475 §3.3.12 (cparam01): Contact parameters register (200)", async () => {
      const text = await expectStatus(
        "cparam01",
        200,
        register({ replace: { Contact: '<sip:cp{{id}}@127.0.0.1>;methods="INVITE";expires=300' } }),
      );
      assert.match(headerOf(text, "Contact") ?? "", /expires=300/);
    });
    await step(
      "RFC 4475 §3.3.13 (cparam02): quoted Contact parameter values register (200)",
      () =>
        expectStatus(
          "cparam02",
          200,
          register({
            replace: { Contact: '<sip:cq{{id}}@127.0.0.1>;+sip.instance="<urn:uuid:1>";q=0.5' },
          }),
        ),
    );
    await step(
      "RFC 4475 §3.3.14 (regescrt): an escaped Route header in a Contact URI is kept (200)",
      async () => {
        const text = await expectStatus(
          "regescrt",
          200,
          register({
            replace: { Contact: "<sip:re{{id}}@127.0.0.1?Route=%3Csip:sip.example.com%3E>" },
          }),
        );
        assert.match(headerOf(text, "Contact") ?? "", /\?Route=%3Csip:sip\.example\.com%3E>/);
      },
    );
    await step(
      "RFC 4475 §3.4.1 (inv2543): an RFC 2543-style Via without branch registers (200)",
      () =>
        expectStatus(
          "inv2543",
          200,
          register({ replace: { Via: "SIP/2.0/UDP 127.0.0.1:{{port}};rport" } }),
        ),
    );

    // --- RFC 5118: IPv6 -----------------------------------------------------------------------
    await step(
      "RFC 5118 §4.1 (ipv6-good): IPv6 references in Request-URI, To, Contact and Via (200)",
      () =>
        expectStatus(
          "ipv6-good",
          200,
          register({
            uri: "sip:[2001:db8::10]",
            replace: {
              To: "<sip:v6{{id}}@[2001:db8::10]>",
              From: "<sip:v6{{id}}@[2001:db8::10]>;tag={{id}}",
              Contact: "<sip:v6{{id}}@[2001:db8::9:1]:5070>",
            },
            extra: ["Via: SIP/2.0/UDP [2001:db8::9:1]:5070;branch=z9hG4bKas3"],
          }),
        ),
    );
    await step(
      "RFC 5118 §4.2 (ipv6-bad): an IPv6 address without brackets in the Request-URI gets 400",
      () => expectStatus("ipv6-bad", 400, register({ uri: "sip:2001:db8::10" })),
    );
    await step(
      "RFC 5118 §4.3 (port-ambiguous): sip:[2001:db8::10:5070] is a host, no port (200)",
      () => expectStatus("port-ambiguous", 200, register({ uri: "sip:[2001:db8::10:5070]" })),
    );
    await step(
      "RFC 5118 §4.4 (port-unambiguous): sip:[2001:db8::10]:5070 (200)",
      () => expectStatus("port-unambiguous", 200, register({ uri: "sip:[2001:db8::10]:5070" })),
    );
    await step(
      "RFC 5118 §4.5: received=[IPv6] with brackets in a Via is accepted (200)",
      () =>
        expectStatus(
          "via-received-brackets",
          200,
          register({
            extra: [
              "Via: SIP/2.0/UDP [2001:db8::9:1];received=[2001:db8::9:255];branch=z9hG4bKas3",
            ],
          }),
        ),
    );
    await step(
      "RFC 5118 §4.5: received=IPv6 without brackets in a Via is accepted (200)",
      () =>
        expectStatus(
          "via-received-bare",
          200,
          register({
            extra: ["Via: SIP/2.0/UDP [2001:db8::9:1];received=2001:db8::9:255;branch=z9hG4bKas3"],
          }),
        ),
    );
    await step(
      "RFC 5118 §4.7: IPv4 and IPv6 Vias in one request (200)",
      () =>
        expectStatus(
          "mult-ip",
          200,
          register({
            extra: [
              "Via: SIP/2.0/UDP [2001:db8::9:1]:5060;branch=z9hG4bKa",
              "Via: SIP/2.0/TCP 192.0.2.1;branch=z9hG4bKb",
            ],
          }),
        ),
    );
    await step(
      "RFC 5118 §4.9 (ipv4-mapped): [::ffff:192.0.2.10] in Contact registers (200)",
      () =>
        expectStatus(
          "ipv4-mapped",
          200,
          register({ replace: { Contact: "<sip:m{{id}}@[::ffff:192.0.2.10]:19823>" } }),
        ),
    );
    await step(
      "RFC 5118 §4.10: an IPv6 reference the RFC 3261 ABNF bug lets through ([2001:db8:::192.0.2.1]) gets 400",
      () =>
        expectStatus(
          "ipv6-abnf-bug",
          400,
          register({ replace: { Contact: "<sip:x{{id}}@[2001:db8:::192.0.2.1]>" } }),
        ),
    );
    await step(
      "RFC 5118 §4.2 class: an unclosed IPv6 reference in the top Via is dropped (no Via to answer, RFC 3261 §18.2.2)",
      () =>
        expectSilence(
          register({ replace: { Via: "SIP/2.0/UDP [2001:db8::9:1;branch=z9hG4bK-{{id}};rport" } }),
        ),
    );

    // --- No amplification, no third address (RFC 3581, RFC 3261 §18.2.2) --------------------------
    await step("RFC 3261 §21.4.1: tiny garbage requests get a small 400 or nothing", async () => {
      const tiny = await expectStatus("tiny", 400, [
        "X sip:a SIP/2.0",
        "v: SIP/2.0/UDP a",
        "f: a",
        "t: b",
        "i: {{id}}",
        "CSeq: x X",
      ]);
      assert.ok(tiny.length <= maxErrorResponse(60), `${tiny.length} bytes`);
      await expectSilence([], "hello\r\n\r\n");
      await expectSilence([], "\u0000\u0001\u0002garbage without any header");
    });
    await step("no amplification: every non-2xx UDP response <= 2 x request + 256 bytes", () => {
      assert.ok(exchanges.length > 30, `only ${exchanges.length} exchanges`);
      const over = exchanges.filter((e) =>
        (e.status < 200 || e.status >= 300) && e.response > maxErrorResponse(e.request)
      );
      assert.deepEqual(over, []);
      return Promise.resolve();
    });
    await step(
      "RFC 3581 §4: a Via naming another host with rport is answered to the source only",
      async () => {
        const victim = await UdpPeer.open("127.0.0.2");
        try {
          const cases: [string, string][] = [
            ["rport", `SIP/2.0/UDP 127.0.0.2:${victim.port};branch=z9hG4bK-{{id}};rport`],
            [
              "maddr",
              `SIP/2.0/UDP 127.0.0.2:${victim.port};maddr=127.0.0.2;rport;branch=z9hG4bK-{{id}}`,
            ],
          ];
          // A client-supplied received= is not believed for the destination either.
          const lied = await send(
            "third-received",
            register({
              replace: {
                Via:
                  `SIP/2.0/UDP 127.0.0.2:${victim.port};received=127.0.0.2;rport;branch=z9hG4bK-{{id}}`,
              },
            }),
          );
          assert.equal(statusOf(lied?.text), 200, "answered at the source despite received=");
          for (const [what, via] of cases) {
            const reply = await send(`third-${what}`, register({ replace: { Via: via } }));
            assert.ok(reply !== null, `${what}: no answer at the source`);
            assert.equal(statusOf(reply.text), 200, what);
            assert.match(headerOf(reply.text, "Via") ?? "", /received=127\.0\.0\.1/, what);
            assert.match(headerOf(reply.text, "Via") ?? "", new RegExp(`rport=${peer.port}`), what);
          }
          // A garbage request (400 built without a parse) naming the victim goes to the source too.
          const bad = await send(
            "third-garbage",
            register({
              replace: { Via: `SIP/2.0/UDP 127.0.0.2:${victim.port};rport;branch=z9hG4bK-{{id}}` },
              version: "SIP/3.0",
            }),
          );
          assert.equal(statusOf(bad?.text), 505);
          await new Promise((r) => setTimeout(r, 200));
          assert.equal(victim.received.length, 0, "nothing is ever sent to the Via's host");
        } finally {
          await victim.close();
        }
      },
    );
    await step(
      "RFC 3261 §18.2.1: a client-supplied received= in the top Via is replaced by the source address",
      async () => {
        const reply = await send(
          "received-overwrite",
          register({
            replace: {
              Via: "SIP/2.0/UDP 127.0.0.2:5060;received=192.0.2.99;rport;branch=z9hG4bK-{{id}}",
            },
          }),
        );
        assert.match(headerOf(reply?.text ?? "", "Via") ?? "", /received=127\.0\.0\.1/);
        assert.doesNotMatch(headerOf(reply?.text ?? "", "Via") ?? "", /192\.0\.2\.99/);
      },
    );
    await step(
      "RFC 3261 §18.2.2: without rport the answer goes to the source address, at the Via port",
      async () => {
        const victim = await UdpPeer.open("127.0.0.2");
        // The same port on the source address: where §18.2.2 says the answer goes.
        let sameHost: UdpPeer;
        try {
          sameHost = await UdpPeer.open("127.0.0.1", victim.port);
        } catch {
          await victim.close();
          return; // the port is taken on 127.0.0.1; nothing to learn
        }
        try {
          const { text, id } = build(
            register({
              replace: { Via: `SIP/2.0/UDP 127.0.0.2:${victim.port};branch=z9hG4bK-{{id}}` },
            }),
            peer.port,
          );
          await peer.send(text, server.udpPort);
          const got = await sameHost.waitFor((d) => d.text.includes(id), 2000);
          assert.ok(got !== null, "answer at source address, Via port");
          assert.equal(statusOf(got.text), 200);
          assert.equal(victim.received.length, 0, "nothing to the Via's host");
        } finally {
          await victim.close();
          await sameHost.close();
        }
      },
    );
    // A query REGISTER names no Contact, but its 200 lists every binding of the AOR (§10.3 step 8):
    // with a spoofed source, a small query reflects the stored bindings at a victim. The registrar
    // bounds that answer: at most --max-bindings (10) contacts of at most --max-contact-length (512)
    // bytes, so a query's answer stays under ~6 KB whatever was stored; the per-source REGISTER limit
    // bounds how often. (With --auth, a spoofed query only ever gets a small 401.)
    await step(
      "issue 6 item 5: a Contact longer than --max-contact-length is refused (400), so a query's answer is bounded",
      async () => {
        const callId = `amp-${Date.now()}@127.0.0.1`;
        await expectStatus(
          "amp-long",
          400,
          register({
            user: "amp",
            replace: {
              "Call-ID": callId,
              CSeq: "1 REGISTER",
              Contact: `<sip:${"x".repeat(1000)}@127.0.0.1:5000>;expires=3600`,
            },
          }),
        );
        for (let i = 0; i < 10; i++) {
          await expectStatus(
            "amp-setup",
            200,
            register({
              user: "amp",
              replace: {
                "Call-ID": callId,
                CSeq: `${i + 2} REGISTER`,
                Contact: `<sip:${"x".repeat(440)}${i}@127.0.0.1:${5000 + i}>;expires=3600`,
              },
            }),
          );
        }
        const query = build(
          register({
            user: "amp",
            replace: { "Call-ID": callId, CSeq: "20 REGISTER", Contact: null },
            extra: ["X-Id: {{id}}"],
          }),
          peer.port,
        );
        const reply = await peer.request(query.text, server.udpPort, query.id, 2000);
        assert.equal(statusOf(reply?.text), 200);
        const bound = 10 * (512 + 40) + 1024;
        assert.ok(
          (reply?.bytes.length ?? 0) <= bound,
          `${query.text.length} B query -> ${reply?.bytes.length} B response (bound ${bound})`,
        );
      },
    );
    await step(
      "the server is still up and registering after all of the above (200)",
      () => expectStatus("final", 200, register()),
    );
    assert.ok(server.alive(), "server still running");
  } finally {
    await peer.close();
    await server.stop();
  }
});
