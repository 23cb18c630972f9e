/**
 * Opening libc for the FFI transports: each names the symbols it calls (one `dlopen` per module and
 * isolate), and reads `errno` through `__errno_location`.
 *
 * @module
 */

/** libc's symbols, and this (main) thread's errno as left by the last synchronous call. */
export interface OpenLibc<S extends Deno.ForeignLibraryInterface> {
  readonly symbols: Deno.DynamicLibrary<S>["symbols"];
  readonly errno: () => number;
}

/** Opens `libc.so.6` with `symbols`, which must include `__errno_location`; `who` names the caller. */
export function openLibc<S extends Deno.ForeignLibraryInterface>(
  symbols: S,
  who: string,
): OpenLibc<S> {
  const lib = Deno.dlopen("libc.so.6", symbols);
  const errnoLocation = (lib.symbols as unknown as { __errno_location(): Deno.PointerValue })
    .__errno_location;
  const where = errnoLocation();
  if (where === null) throw new Error(`${who}: __errno_location returned NULL`);
  const view = new Deno.UnsafePointerView(where);
  return { symbols: lib.symbols, errno: () => view.getInt32(0) };
}
