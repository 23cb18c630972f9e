/**
 * Micro-benchmarks of the SIP message layer: `deno bench --allow-all sip/`.
 *
 * @module
 */

import { parseMessage } from "./parse.ts";
import { scanFirstLine } from "./first_line.ts";
import {
  header,
  parseContacts,
  parseCSeq,
  parseExpires,
  parseUri,
  parseVia,
  tagOf,
} from "./headers.ts";
import { buildResponse, quickResponse } from "./serialize.ts";
import type { SipRequest } from "./message.ts";
import { TYPICAL_REGISTER } from "./_bench_data.ts";

const parsed = parseMessage(TYPICAL_REGISTER);
if (!parsed.ok || parsed.value.kind !== "request") {
  throw new Error("Cannot bench: fixture does not parse");
}
const req: SipRequest = parsed.value;

Deno.bench({
  name: `parseMessage, typical REGISTER (${TYPICAL_REGISTER.length} B)`,
  group: "parse",
  baseline: true,
  fn() {
    parseMessage(TYPICAL_REGISTER);
  },
});

Deno.bench({
  name: "scanFirstLine",
  group: "parse",
  fn() {
    scanFirstLine(TYPICAL_REGISTER);
  },
});

/** What the registrar reads from each REGISTER. */
function registrarView(m: SipRequest): number {
  let n = 0;
  const via = parseVia(header(m, "via") ?? "");
  if (via.ok) n += via.value.port ?? 0;
  n += tagOf(header(m, "from") ?? "")?.length ?? 0;
  n += tagOf(header(m, "to") ?? "")?.length ?? 0;
  n += header(m, "call-id")?.length ?? 0;
  const cseq = parseCSeq(header(m, "cseq") ?? "");
  if (cseq.ok) n += cseq.value.seq;
  const contacts = parseContacts(m);
  if (contacts.ok && !contacts.value.star) n += contacts.value.contacts.length;
  n += parseExpires(header(m, "expires") ?? "") ?? 0;
  return n;
}

Deno.bench({
  name: "parseMessage + registrar accessors (Via, tags, Call-ID, CSeq, Contact, Expires)",
  group: "parse",
  fn() {
    const r = parseMessage(TYPICAL_REGISTER);
    if (r.ok && r.value.kind === "request") registrarView(r.value);
  },
});

Deno.bench({
  name: "registrar accessors only",
  group: "parse",
  fn() {
    registrarView(req);
  },
});

Deno.bench({
  name: "parseUri of the To URI",
  group: "parse",
  fn() {
    parseUri("sip:1001@example.com");
  },
});

Deno.bench({
  name: "quickResponse 503 from raw bytes",
  group: "respond",
  baseline: true,
  fn() {
    quickResponse(TYPICAL_REGISTER, 503, "Service Unavailable", [["Retry-After", "5"]]);
  },
});

Deno.bench({
  name: "parseMessage + buildResponse 503",
  group: "respond",
  fn() {
    const r = parseMessage(TYPICAL_REGISTER);
    if (r.ok && r.value.kind === "request") {
      buildResponse(r.value, 503, "Service Unavailable", {
        toTag: "x1",
        headers: [["Retry-After", "5"]],
      });
    }
  },
});

Deno.bench({
  name: "buildResponse 200 OK with Contact (message already parsed)",
  group: "respond",
  fn() {
    buildResponse(req, 200, "OK", {
      toTag: "x1",
      topVia:
        "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-524287-1---77ba1d5f6e;rport=5060;received=192.0.2.10",
      headers: [["Contact", "<sip:1001@192.0.2.10:5060;transport=udp>;expires=3600"]],
    });
  },
});
