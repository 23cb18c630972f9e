/**
 * Runs a self-contained function in a Web Worker (its own thread), so that a load it generates
 * does not delay the test's own timers and sockets: `fn` is sent to the worker as source text, so
 * it may use only globals (Deno, Atomics, postMessage...) and what it receives in its first message.
 *
 * @module
 */

/** Runs `fn` in a Web Worker, posts it `spec`, and resolves with the first message it posts back. */
export function runInWorker<S, R>(fn: () => void, spec: S): Promise<R> {
  const source = `(${fn.toString()})();`;
  const url = URL.createObjectURL(new Blob([source], { type: "application/javascript" }));
  const worker = new Worker(url, { type: "module" });
  const done = Promise.withResolvers<R>();
  worker.onmessage = (e: MessageEvent<R>) => done.resolve(e.data);
  worker.onerror = (e) => {
    e.preventDefault();
    done.reject(new Error(`${fn.name || "worker"} failed: ${e.message}`));
  };
  worker.postMessage(spec);
  return done.promise.finally(() => {
    worker.terminate();
    URL.revokeObjectURL(url);
  });
}
