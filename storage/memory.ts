/**
 * An in-memory {@link LocationStore}: the reference for the semantics every store shares, and the store
 * for benchmarks of the server without a database. It keeps nothing across restarts.
 *
 * @module
 */
import type { Binding, LocationStore, RegisterChange, RegisterOutcome } from "./location_store.ts";

/** Orders bindings by q (absent counts as 1.0, RFC 3261 §10.2.1.2), then by most recent update. */
export function compareBindings(a: Binding, b: Binding): number {
  return (b.q ?? 1) - (a.q ?? 1) || b.updatedAt - a.updatedAt;
}

/**
 * Computes the bindings of one AOR after a REGISTER, following RFC 3261 §10.3 steps 6-7, or says why the
 * request fails. Pure: stores call it on the bindings they hold and persist the result.
 */
export function applyRegister(
  current: readonly Binding[],
  change: RegisterChange,
): { ok: true; bindings: Binding[] } | { ok: false; reason: "out-of-order" | "too-many-bindings" } {
  const live = current.filter((b) => b.expiresAt > change.now);
  if (change.removeAll) {
    // §10.3 step 6: with the same Call-ID a binding goes only if the request's CSeq is higher.
    for (const b of live) {
      if (b.callId === change.callId && change.cseq <= b.cseq) {
        return { ok: false, reason: "out-of-order" };
      }
    }
    return { ok: true, bindings: [] };
  }
  const next = new Map<string, Binding>();
  for (const b of live) next.set(b.key, b);
  for (const c of change.contacts) {
    const existing = next.get(c.key);
    // §10.3 step 7: same Call-ID and a CSeq not higher aborts the whole request.
    if (existing && existing.callId === change.callId && change.cseq <= existing.cseq) {
      return { ok: false, reason: "out-of-order" };
    }
    if (c.expires === 0) {
      next.delete(c.key);
      continue;
    }
    next.set(c.key, {
      aor: change.aor,
      key: c.key,
      contact: c.contact,
      expiresAt: change.now + c.expires * 1000,
      q: c.q,
      callId: change.callId,
      cseq: change.cseq,
      instanceId: c.instanceId,
      regId: c.regId,
      source: change.source,
      path: change.path,
      userAgent: change.userAgent,
      updatedAt: change.now,
    });
  }
  if (change.contacts.length > 0 && next.size > change.maxBindings && next.size > live.length) {
    return { ok: false, reason: "too-many-bindings" };
  }
  return { ok: true, bindings: [...next.values()].sort(compareBindings) };
}

/** Bindings in a Map keyed by AOR. Every change is "durable" at once. */
export class MemoryLocationStore implements LocationStore {
  readonly #aors = new Map<string, Binding[]>();

  register(change: RegisterChange): Promise<RegisterOutcome> {
    const result = applyRegister(this.#aors.get(change.aor) ?? [], change);
    if (!result.ok) return Promise.resolve(result);
    if (result.bindings.length === 0) this.#aors.delete(change.aor);
    else this.#aors.set(change.aor, result.bindings);
    return Promise.resolve({ ok: true, bindings: result.bindings });
  }

  lookup(aor: string, now: number): Promise<readonly Binding[]> {
    const all = this.#aors.get(aor) ?? [];
    return Promise.resolve(all.filter((b) => b.expiresAt > now));
  }

  sweep(now: number): Promise<number> {
    let removed = 0;
    for (const [aor, bindings] of this.#aors) {
      const live = bindings.filter((b) => b.expiresAt > now);
      removed += bindings.length - live.length;
      if (live.length === 0) this.#aors.delete(aor);
      else if (live.length !== bindings.length) this.#aors.set(aor, live);
    }
    return Promise.resolve(removed);
  }

  count(now: number): Promise<number> {
    let n = 0;
    for (const bindings of this.#aors.values()) {
      for (const b of bindings) if (b.expiresAt > now) n++;
    }
    return Promise.resolve(n);
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}
