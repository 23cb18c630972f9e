/**
 * The fuzz corpus (seed messages under `tests/fixtures/fuzz/` and `tests/fixtures/sip/`, plus every
 * kept crash) and the crash store (`tests/fixtures/fuzz/crashes/`).
 *
 * @module
 */

import { toBinary } from "./mutate.ts";

const ROOT = new URL("../tests/fixtures/", import.meta.url);
/** Where seed messages live. */
export const SEED_DIR: URL = new URL("fuzz/", ROOT);
/** Where failing inputs are kept, one `.bin` (raw bytes) and one `.json` (what failed) each. */
export const CRASH_DIR: URL = new URL("fuzz/crashes/", ROOT);

function readDir(dir: URL, suffixes: readonly string[]): { name: string; bytes: Uint8Array }[] {
  const out: { name: string; bytes: Uint8Array }[] = [];
  let entries: Deno.DirEntry[];
  try {
    entries = [...Deno.readDirSync(dir)];
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return out;
    throw error;
  }
  entries.sort((a, b) => a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
  for (const e of entries) {
    if (!e.isFile || !suffixes.some((s) => e.name.endsWith(s))) continue;
    out.push({ name: e.name, bytes: Deno.readFileSync(new URL(e.name, dir)) });
  }
  return out;
}

/** Seed messages, as binary strings, in a stable order (a seed reproduces a run). */
export function loadCorpus(): string[] {
  const files = [
    ...readDir(SEED_DIR, [".sip"]),
    ...readDir(new URL("sip/", ROOT), [".txt"]),
    ...readDir(CRASH_DIR, [".bin"]),
  ];
  if (files.length === 0) throw new Error("Cannot fuzz: no corpus under tests/fixtures/fuzz/");
  return files.map((f) => toBinary(f.bytes));
}

/** Every kept failing input, by file name. */
export function loadCrashes(): { name: string; bytes: Uint8Array }[] {
  return readDir(CRASH_DIR, [".bin"]);
}

/** FNV-1a 32-bit hash of bytes, as 8 hex digits. */
export function hashOf(bytes: Uint8Array): string {
  let h = 0x811c9dc5;
  for (let i = 0; i < bytes.length; i++) h = Math.imul(h ^ bytes[i]!, 0x01000193);
  return (h >>> 0).toString(16).padStart(8, "0");
}

/** Writes a failing input and what failed to the crash store; returns the file name. */
export function saveCrash(
  input: Uint8Array,
  info: { kind: string; detail: string; seed?: number; ops?: readonly string[] },
): string {
  Deno.mkdirSync(CRASH_DIR, { recursive: true });
  const slug = info.kind.replace(/[^a-zA-Z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 60);
  const name = `${slug}-${hashOf(input)}`;
  Deno.writeFileSync(new URL(`${name}.bin`, CRASH_DIR), input);
  Deno.writeTextFileSync(
    new URL(`${name}.json`, CRASH_DIR),
    JSON.stringify({ ...info, detail: info.detail.slice(0, 2000), bytes: input.length }, null, 2) +
      "\n",
  );
  return name;
}
