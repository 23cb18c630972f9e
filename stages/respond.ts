/**
 * The respond stage: serialises a response and sends it where RFC 3261 §18.2.2 says. Over TCP, on the
 * flow the request arrived on. Over UDP, to the source address, and to the source port when the top Via
 * asked for `rport` (RFC 3581 §4), else to the Via's sent-by port (default 5060). The top Via gets
 * `received` when its sent-by host is not the packet's source (§18.2.1) and `rport=<port>` when asked.
 *
 * @module
 */
import { buildResponse } from "../sip/serialize.ts";
import { headerAll, parseVia } from "../sip/headers.ts";
import type { Reply } from "./items.ts";
import { Stage } from "./runtime.ts";

/** Queue and worker settings. Sending is synchronous (kernel buffers), so one at a time inline. */
export const RESPOND_SETTINGS = { capacity: 8192, concurrency: 1, mode: "inline" } as const;

const tagPrefix = crypto.randomUUID().slice(0, 8);
let tagCounter = 0;

/** A To tag for our responses (RFC 3261 §8.2.6.2): unique per process and response. */
export function localTag(): string {
  return tagPrefix + (tagCounter++).toString(36);
}

/** The top Via with `received`/`rport` filled in, and the UDP port to answer to. */
export function responseVia(
  rawTopVia: string,
  address: string,
  port: number,
): { via: string; port: number } | null {
  const parsed = parseVia(rawTopVia);
  if (!parsed.ok) return null;
  const v = parsed.value;
  let via = rawTopVia;
  const wantsRport = v.params.has("rport");
  if (wantsRport && v.params.get("rport") == null) {
    via = via.replace(/;\s*rport(?=\s*(;|$))/i, `;rport=${port}`);
  }
  const sentByHost = v.host.replace(/^\[|\]$/g, "").toLowerCase();
  if (v.params.has("received")) {
    // §18.2.1: the server sets received itself; a client's own value is replaced, never trusted.
    via = via.replace(/;\s*received\s*=\s*[^;]*/i, "");
  }
  if (sentByHost !== address.toLowerCase()) {
    via += `;received=${address}`;
  }
  return { via, port: wantsRport ? port : v.port ?? 5060 };
}

/** Builds the respond stage. */
export function createRespondStage(onError: (error: unknown, stage: string) => void): Stage<Reply> {
  const stage: Stage<Reply> = new Stage<Reply>({
    name: "respond",
    ...RESPOND_SETTINGS,
    onError,
    handler(reply) {
      const { inbound } = reply;
      const { source } = inbound;
      let bytes = reply.bytes;
      let udpPort = source.port;
      if (bytes === null) {
        const request = reply.request!;
        const top = headerAll(request, "via")[0];
        const via = top === undefined ? null : responseVia(top, source.address, source.port);
        if (via === null) {
          stage.drop("bad-via");
          return;
        }
        udpPort = via.port;
        bytes = buildResponse(request, reply.status, reply.reason, {
          toTag: localTag(),
          headers: reply.headers,
          topVia: via.via,
        });
      }
      if (inbound.flow !== null) {
        if (!inbound.flow.send(bytes)) stage.drop("flow-gone");
      } else if (inbound.udp !== null) {
        inbound.udp.send(bytes, source.address, udpPort);
      }
      reply.onSent?.(bytes);
    },
  });
  return stage;
}
