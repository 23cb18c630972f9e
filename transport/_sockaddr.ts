/**
 * Socket addresses as libc sees them, for the FFI transports: address families, text forms of raw
 * addresses, and host names resolved to literals.
 *
 * @module
 */
import { lookup } from "node:dns/promises";

/** `AF_INET` on Linux. */
export const AF_INET = 2;
/** `AF_INET6` on Linux. */
export const AF_INET6 = 10;

/** Text of an IPv4 address (4 bytes at `at`). */
export function formatIPv4(b: Uint8Array, at: number): string {
  return `${b[at]}.${b[at + 1]}.${b[at + 2]}.${b[at + 3]}`;
}

/**
 * Text of an IPv6 address (16 bytes at `at`) in RFC 5952 form: lower-case hex, the longest run of
 * two or more zero groups as `::` (the first of equal runs), IPv4-mapped as `::ffff:a.b.c.d`.
 */
export function formatIPv6(b: Uint8Array, at: number): string {
  const groups: number[] = [];
  for (let i = 0; i < 8; i++) groups.push((b[at + 2 * i]! << 8) | b[at + 2 * i + 1]!);
  if (groups[0] === 0 && groups[1] === 0 && groups[2] === 0 && groups[3] === 0 && groups[4] === 0) {
    if (groups[5] === 0xffff) return `::ffff:${formatIPv4(b, at + 12)}`;
  }
  let bestAt = -1;
  let bestLen = 1;
  for (let i = 0; i < 8;) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen) {
      bestAt = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = (from: number, to: number) =>
    groups.slice(from, to).map((g) => g.toString(16)).join(":");
  if (bestAt < 0) return hex(0, 8);
  return `${hex(0, bestAt)}::${hex(bestAt + bestLen, 8)}`;
}

/** An IP literal for `host`: as given, or the first address a name resolves to. */
export async function literalFor(host: string): Promise<{ address: string; family: number }> {
  const bare = host.startsWith("[") && host.endsWith("]") ? host.slice(1, -1) : host;
  if (bare.includes(":")) return { address: bare, family: AF_INET6 };
  if (/^\d{1,3}(\.\d{1,3}){3}$/.test(bare)) return { address: bare, family: AF_INET };
  const found = await lookup(bare);
  return { address: found.address, family: found.family === 6 ? AF_INET6 : AF_INET };
}
