/**
 * Starts the real citysip server (`main.ts serve`) as a subprocess for end-to-end tests, on port 0 by
 * default, and reads the ports it chose from its `msg=listening` log lines on stderr.
 *
 * stderr is read continuously (a full pipe would block the server) and kept in `stderrLines`. Every
 * server started here is also killed when the test process unloads, so a failing test leaves no
 * process behind; tests should still `await server.stop()` in a `finally`.
 *
 * @module
 */

/** The entry point under test. */
export const MAIN = new URL("../main.ts", import.meta.url).pathname;

/** One `msg=listening` line. */
export interface Listening {
  readonly transport: "udp" | "tcp";
  readonly address: string;
  readonly port: number;
}

/** A running server. */
export interface TestServer {
  /** The first UDP port listened on (0 when there is none). */
  readonly udpPort: number;
  /** The first TCP port listened on (0 when there is none). */
  readonly tcpPort: number;
  /** Every listener, in the order logged. */
  readonly listening: readonly Listening[];
  /** stderr so far, one entry per line; grows while the server runs. */
  readonly stderrLines: string[];
  readonly pid: number;
  /**
   * Sends `signal` (default SIGTERM), waits for the exit and returns the exit code. After a grace
   * period the process is killed with SIGKILL. Safe to call more than once: later calls return the
   * first exit code.
   */
  stop(signal?: Deno.Signal): Promise<number>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** How to start the server. */
export interface StartOptions {
  /**
   * Flags after `serve`. Without a `--listen` flag the server listens on `udp:127.0.0.1:0` and
   * `tcp:127.0.0.1:0`; without `--store`, `--store memory`; without `--workers`, `--workers 1`
   * (with the memory store each worker keeps its own bindings, so a test needs exactly one).
   * @default []
   */
  readonly flags?: readonly string[];
  /** How long to wait for every listener to be logged. @default 20000 */
  readonly readyTimeoutMs?: number;
  /** Grace period between the stop signal and SIGKILL. @default 10000 */
  readonly killAfterMs?: number;
}

const running = new Set<Deno.ChildProcess>();
globalThis.addEventListener("unload", () => {
  for (const child of running) {
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
  }
});

const LISTENING = /\bmsg=listening\b.*\btransport=(udp|tcp)\b.*\baddress=(\S+).*\bport=(\d+)/;

/** The Deno command line that runs `main.ts` with `args`. */
export function mainCommand(args: readonly string[]): { command: string; args: string[] } {
  return {
    command: Deno.execPath(),
    args: ["run", "--allow-all", "--unstable-net", MAIN, ...args],
  };
}

/** Starts `main.ts serve` and resolves once it has logged every listener it was asked for. */
export async function startServer(options: StartOptions = {}): Promise<TestServer> {
  const flags = [...(options.flags ?? [])];
  if (!flags.includes("--listen")) {
    flags.push("--listen", "udp:127.0.0.1:0", "--listen", "tcp:127.0.0.1:0");
  }
  if (!flags.includes("--store")) flags.push("--store", "memory");
  if (!flags.includes("--workers")) flags.push("--workers", "1");
  // The tests' load comes from one address (127.0.0.1): per-source limits off unless a test asks.
  if (!flags.includes("--register-rate")) flags.push("--register-rate", "0");
  if (!flags.includes("--connect-rate")) flags.push("--connect-rate", "0");
  const expected = flags.filter((f) => f === "--listen").length;

  const { command, args } = mainCommand(["serve", ...flags]);
  const child = new Deno.Command(command, {
    args,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  running.add(child);

  const stderrLines: string[] = [];
  const listening: Listening[] = [];
  const ready = Promise.withResolvers<void>();
  const drained = (async () => {
    let buffer = "";
    const decoder = new TextDecoder();
    const take = (line: string) => {
      stderrLines.push(line);
      const m = LISTENING.exec(line);
      if (m) {
        listening.push({
          transport: m[1] as "udp" | "tcp",
          address: m[2]!,
          port: Number(m[3]),
        });
        if (listening.length >= expected) ready.resolve();
      }
    };
    for await (const chunk of child.stderr) {
      buffer += decoder.decode(chunk, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        take(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
      }
    }
    if (buffer !== "") take(buffer);
  })();

  let stopping: Promise<number> | null = null;
  const exited = child.status.then((s) => {
    running.delete(child);
    return s;
  });
  const stop = (signal: Deno.Signal = "SIGTERM"): Promise<number> => {
    stopping ??= (async () => {
      try {
        child.kill(signal);
      } catch {
        // already exited
      }
      const timer = setTimeout(() => {
        try {
          child.kill("SIGKILL");
        } catch {
          // exited meanwhile
        }
      }, options.killAfterMs ?? 10_000);
      const status = await exited;
      clearTimeout(timer);
      await drained.catch(() => {});
      return status.code;
    })();
    return stopping;
  };

  const timeoutMs = options.readyTimeoutMs ?? 20_000;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const outcome = await Promise.race([
    ready.promise.then(() => "ready" as const),
    exited.then(() => "exited" as const),
    new Promise<"timeout">((r) => timer = setTimeout(() => r("timeout"), timeoutMs)),
  ]);
  clearTimeout(timer);
  if (outcome !== "ready") {
    const code = await stop("SIGKILL");
    throw new Error(
      `Cannot start the server (${outcome}, exit code ${code}): ${args.join(" ")}\n` +
        stderrLines.join("\n"),
    );
  }

  return {
    udpPort: listening.find((l) => l.transport === "udp")?.port ?? 0,
    tcpPort: listening.find((l) => l.transport === "tcp")?.port ?? 0,
    listening,
    stderrLines,
    pid: child.pid,
    stop,
    async [Symbol.asyncDispose]() {
      await stop();
    },
  };
}

/** Whether this machine can bind the IPv6 loopback `::1`. */
export function hasIpv6Loopback(): boolean {
  try {
    const l = Deno.listen({ hostname: "::1", port: 0 });
    l.close();
    return true;
  } catch {
    return false;
  }
}
