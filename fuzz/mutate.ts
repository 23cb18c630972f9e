/**
 * Mutations of SIP messages for the fuzzer: byte-level (bit flips, random bytes, truncation, long
 * runs) and line-level (duplicate, delete, splice, fold, odd whitespace, wrong line ends, compact
 * forms, huge and negative numbers). Every choice comes from the given {@linkcode Rng}.
 *
 * @module
 */

import type { Rng } from "./prng.ts";

const enc = new TextEncoder();
const latin1 = new TextDecoder("latin1");

/** Bytes -> a string of one char per byte (lossless for any input). */
export function toBinary(bytes: Uint8Array): string {
  return latin1.decode(bytes);
}

/** A string of one char per byte -> bytes (chars above 0xff are written as UTF-8). */
export function fromBinary(s: string): Uint8Array {
  let wide = false;
  for (let i = 0; i < s.length; i++) {
    if (s.charCodeAt(i) > 0xff) {
      wide = true;
      break;
    }
  }
  if (wide) return enc.encode(s);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

const NUMBERS = [
  "-1",
  "0",
  "-0",
  "00000000000000000000001",
  "2147483647",
  "2147483648",
  "4294967295",
  "4294967296",
  "9007199254740993",
  "99999999999999999999999999999999",
  "1e9",
  "0x10",
  "+5",
  "1.5",
  " 7 ",
  "65536",
  "65535",
  "-65536",
  "NaN",
  "Infinity",
];

const SPECIALS = [
  "<",
  ">",
  '"',
  "\\",
  ";",
  ",",
  "=",
  "@",
  ":",
  "[",
  "]",
  "%",
  "%0",
  "%zz",
  "%00",
  "?",
  "&",
  "*",
  "\u0000",
  "\u00ff",
  "\u00c3\u00a9",
  "\u00e2\u0082\u00ac",
  "\u00f0\u009f\u0098\u0080",
  "\u00c3",
  ";;",
  "<<",
  ">>",
  '""',
  "\t",
  " ",
  "sip:",
  "sips:",
  "tel:",
  "mailto:",
  "[::1]",
  "[2001:db8::1]:5060",
  "[",
  ";rport",
  ";tag=",
  ";expires=",
  ";q=",
  ";branch=z9hG4bK",
  "SIP/2.0",
  "SIP/",
  "SIP/2.0/UDP",
];

const HEADER_NAMES: ReadonlyArray<readonly [string, string]> = [
  ["Via", "v"],
  ["From", "f"],
  ["To", "t"],
  ["Call-ID", "i"],
  ["Contact", "m"],
  ["Content-Length", "l"],
  ["Content-Type", "c"],
  ["Supported", "k"],
  ["Subject", "s"],
  ["Content-Encoding", "e"],
];

const EXTRA_LINES = [
  "Content-Length: 0",
  "Content-Length: -1",
  "Content-Length: 99999999999",
  "l: 5",
  "Content-Length : 3",
  "Expires: 4294967296",
  "Expires: -5",
  "Contact: *",
  "Contact: <sip:a@b>;expires=99999999999999",
  "m: sip:x@[::1]:5060;q=1.0",
  "CSeq: 4294967296 REGISTER",
  "CSeq: -1 REGISTER",
  "Via: SIP/2.0/UDP [2001:db8::9:1]:5060;branch=z9hG4bKx;rport",
  "v: SIP / 2.0 / TCP host:99999",
  "Require: unknownext",
  "Max-Forwards: 0",
  " folded continuation",
  "\tfolded tab",
  ":",
  "NoColon",
  ": novalue",
  "X-Empty:",
  "To: <sip:a@b",
  'From: "unterminated <sip:a@b>',
];

/** The names of the mutations, for statistics. */
export const MUTATIONS = [
  "bitflip",
  "byte",
  "truncate",
  "insert-random",
  "delete-range",
  "dup-line",
  "delete-line",
  "swap-lines",
  "splice-line",
  "splice-message",
  "number",
  "whitespace",
  "fold",
  "line-end",
  "compact",
  "long-token",
  "special",
  "extra-line",
  "case",
  "repeat",
] as const;

/** One mutation's name. */
export type Mutation = typeof MUTATIONS[number];

/** Splits on "\n" keeping each line's own ending intact (the last piece may have none). */
function lines(s: string): string[] {
  const out: string[] = [];
  let from = 0;
  for (;;) {
    const nl = s.indexOf("\n", from);
    if (nl < 0) break;
    out.push(s.slice(from, nl + 1));
    from = nl + 1;
  }
  if (from < s.length) out.push(s.slice(from));
  return out;
}

/** Index range [start, end) of the header section's lines (excludes the first line and body). */
function headerLines(ls: string[]): [number, number] {
  let end = 1;
  while (end < ls.length && ls[end] !== "\r\n" && ls[end] !== "\n") end++;
  return [Math.min(1, ls.length), Math.min(end, ls.length)];
}

function longRun(rng: Rng): string {
  const unit = rng.pick(["a", "1", " ", ";", "%", "\r\n ", ",", "<", "x=y;", "\t", "0", "["]);
  const n = rng.chance(0.05)
    ? rng.pick([16384, 65535, 65536, 70000])
    : rng.pick([64, 255, 256, 1024, 4095, 4096, 4097]);
  return unit.repeat(Math.ceil(n / unit.length));
}

/** Applies one named mutation to `s` (binary string). */
export function applyMutation(rng: Rng, m: Mutation, s: string, corpus: readonly string[]): string {
  const n = s.length;
  switch (m) {
    case "bitflip": {
      if (n === 0) return s;
      const i = rng.int(n);
      const c = s.charCodeAt(i) ^ (1 << rng.int(8));
      return s.slice(0, i) + String.fromCharCode(c) + s.slice(i + 1);
    }
    case "byte": {
      const i = rng.int(n + 1);
      return s.slice(0, i) + String.fromCharCode(rng.int(256)) + s.slice(i + 1);
    }
    case "truncate":
      return s.slice(0, rng.int(n + 1));
    case "insert-random": {
      const i = rng.int(n + 1);
      let r = "";
      const k = 1 + rng.int(rng.chance(0.1) ? 512 : 16);
      for (let j = 0; j < k; j++) r += String.fromCharCode(rng.int(256));
      return s.slice(0, i) + r + s.slice(i);
    }
    case "delete-range": {
      const i = rng.int(n + 1);
      return s.slice(0, i) + s.slice(i + 1 + rng.int(32));
    }
    case "dup-line": {
      const ls = lines(s);
      if (ls.length === 0) return s;
      const i = rng.int(ls.length);
      const times = rng.chance(0.02) ? 100 + rng.int(2000) : 1 + rng.int(3);
      ls.splice(i, 0, ...Array<string>(times).fill(ls[i]!));
      return ls.join("");
    }
    case "delete-line": {
      const ls = lines(s);
      if (ls.length === 0) return s;
      ls.splice(rng.int(ls.length), 1);
      return ls.join("");
    }
    case "swap-lines": {
      const ls = lines(s);
      if (ls.length < 2) return s;
      const i = rng.int(ls.length), j = rng.int(ls.length);
      const t = ls[i]!;
      ls[i] = ls[j]!;
      ls[j] = t;
      return ls.join("");
    }
    case "splice-line": {
      const other = lines(rng.pick(corpus));
      const ls = lines(s);
      if (other.length === 0) return s;
      const [a, b] = headerLines(ls);
      ls.splice(a + rng.int(b - a + 1), 0, rng.pick(other));
      return ls.join("");
    }
    case "splice-message": {
      const other = rng.pick(corpus);
      return s.slice(0, rng.int(n + 1)) + other.slice(rng.int(other.length + 1));
    }
    case "number": {
      // Replace one run of digits with an odd number.
      const runs: [number, number][] = [];
      for (let i = 0; i < n; i++) {
        const c = s.charCodeAt(i);
        if (c >= 0x30 && c <= 0x39) {
          let j = i;
          while (j < n && s.charCodeAt(j) >= 0x30 && s.charCodeAt(j) <= 0x39) j++;
          runs.push([i, j]);
          i = j;
        }
      }
      if (runs.length === 0) return s;
      const [a, b] = rng.pick(runs);
      return s.slice(0, a) + rng.pick(NUMBERS) + s.slice(b);
    }
    case "whitespace": {
      const ws = rng.pick([" ", "\t", "  ", " \t ", "\r\n ", "\r\n\t", "\u000b", "\u00a0"]);
      const targets: number[] = [];
      for (let i = 0; i < n; i++) {
        const c = s.charCodeAt(i);
        if (c === 0x3a || c === 0x3b || c === 0x2f || c === 0x20 || c === 0x3d || c === 0x2c) {
          targets.push(i);
        }
      }
      const i = targets.length > 0 && rng.chance(0.8) ? rng.pick(targets) : rng.int(n + 1);
      const after = rng.chance(0.5) ? 1 : 0;
      return s.slice(0, i + after) + ws + s.slice(i + after);
    }
    case "fold": {
      const ls = lines(s);
      const [a, b] = headerLines(ls);
      if (b <= a) return s;
      const i = a + rng.int(b - a);
      const line = ls[i]!;
      const sp = line.indexOf(" ", rng.int(line.length));
      const at = sp < 0 ? rng.int(line.length) : sp;
      ls[i] = line.slice(0, at) + rng.pick(["\r\n ", "\r\n\t", "\r\n  \t "]) + line.slice(at);
      return ls.join("");
    }
    case "line-end": {
      const crlfs: number[] = [];
      for (let i = s.indexOf("\r\n"); i >= 0; i = s.indexOf("\r\n", i + 2)) crlfs.push(i);
      if (crlfs.length === 0) return s + "\r\n";
      const i = rng.pick(crlfs);
      const repl = rng.pick(["\n", "\r", "\r\r\n", "\n\r", "\r\n\r\n", "", "\r\n\r\n\r\n", "\n\n"]);
      return s.slice(0, i) + repl + s.slice(i + 2);
    }
    case "compact": {
      const [long, short] = rng.pick(HEADER_NAMES);
      const toShort = rng.chance(0.5);
      const from = "\n" + (toShort ? long : short) + ":";
      const i = s.toLowerCase().indexOf(from.toLowerCase());
      if (i < 0) return s;
      const name = toShort ? (rng.chance(0.5) ? short.toUpperCase() : short) : long;
      return s.slice(0, i + 1) + name + (rng.chance(0.3) ? " " : "") + s.slice(i + from.length - 1);
    }
    case "long-token": {
      const i = rng.int(n + 1);
      return s.slice(0, i) + longRun(rng) + s.slice(i);
    }
    case "special": {
      const i = rng.int(n + 1);
      return s.slice(0, i) + rng.pick(SPECIALS) + s.slice(i);
    }
    case "extra-line": {
      const ls = lines(s);
      const [a, b] = headerLines(ls);
      ls.splice(a + rng.int(b - a + 1), 0, rng.pick(EXTRA_LINES) + "\r\n");
      return ls.join("");
    }
    case "case": {
      if (n === 0) return s;
      const i = rng.int(n);
      const k = 1 + rng.int(12);
      const part = s.slice(i, i + k);
      return s.slice(0, i) + (rng.chance(0.5) ? part.toUpperCase() : part.toLowerCase()) +
        s.slice(i + k);
    }
    case "repeat":
      return s + (rng.chance(0.5) ? s : rng.pick(corpus));
  }
}

/** Maximum input size the fuzzer builds (larger mutations are cut). */
export const MAX_INPUT = 140_000;

/** One mutated input from a random corpus entry: 1 to 6 stacked mutations. */
export function mutate(
  rng: Rng,
  corpus: readonly string[],
): { input: Uint8Array; ops: Mutation[] } {
  let s = rng.pick(corpus);
  const ops: Mutation[] = [];
  const count = 1 + rng.int(rng.chance(0.2) ? 6 : 3);
  for (let k = 0; k < count; k++) {
    const m = rng.pick(MUTATIONS);
    ops.push(m);
    s = applyMutation(rng, m, s, corpus);
    if (s.length > MAX_INPUT) s = s.slice(0, MAX_INPUT);
  }
  return { input: fromBinary(s), ops };
}
