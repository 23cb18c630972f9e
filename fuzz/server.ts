/**
 * Starts the real server (`main.ts serve`, in-memory store, one worker) on ephemeral loopback ports
 * for the network fuzzer and the conformance tests, and stops it again.
 *
 * @module
 */

/** A running server subprocess. */
export interface ServerProcess {
  readonly udpPort: number;
  readonly tcpPort: number;
  readonly targets: { udp: string; tcp: string };
  /** Whether the process is still running. */
  readonly alive: () => boolean;
  /** Everything the server wrote to stderr so far. */
  readonly log: () => string;
  /** Sends SIGTERM and waits for the exit (SIGKILL after 5 s). */
  stop(): Promise<void>;
}

const MAIN = new URL("../main.ts", import.meta.url);

/** Starts the server with `extraArgs` added to `serve`; resolves once it listens on UDP and TCP. */
export async function startServer(extraArgs: readonly string[] = []): Promise<ServerProcess> {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "--unstable-net",
      MAIN.pathname,
      "serve",
      "--store",
      "memory",
      "--workers",
      "1",
      "--register-rate",
      "0",
      "--connect-rate",
      "0",
      "--listen",
      "udp:127.0.0.1:0",
      "--listen",
      "tcp:127.0.0.1:0",
      ...extraArgs,
    ],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });
  let text = "";
  let udpPort = 0;
  let tcpPort = 0;
  let ready!: () => void;
  const listening = new Promise<void>((resolve) => ready = resolve);
  const decoder = new TextDecoder();
  const pump = (async () => {
    for await (const chunk of child.stderr) {
      text += decoder.decode(chunk, { stream: true });
      if (text.length > 1_000_000) text = text.slice(-500_000);
      if (udpPort === 0 || tcpPort === 0) {
        const udp = /msg=listening transport=udp address=\S+ port=(\d+)/.exec(text);
        const tcp = /msg=listening transport=tcp address=\S+ port=(\d+)/.exec(text);
        if (udp !== null) udpPort = Number(udp[1]);
        if (tcp !== null) tcpPort = Number(tcp[1]);
        if (udpPort !== 0 && tcpPort !== 0) ready();
      }
    }
  })();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<"timeout">((r) => timer = setTimeout(() => r("timeout"), 20_000));
  const first = await Promise.race([listening, status, timeout]);
  clearTimeout(timer);
  const stop = async (): Promise<void> => {
    if (!exited) {
      try {
        child.kill("SIGTERM");
      } catch { /* already gone */ }
      const kill = setTimeout(() => {
        try {
          child.kill("SIGKILL");
        } catch { /* already gone */ }
      }, 5000);
      await status;
      clearTimeout(kill);
    }
    await pump.catch(() => {});
  };
  if (first !== undefined) {
    await stop();
    throw new Error(
      `Cannot start server: ${first === "timeout" ? "no listening line" : "exited"}\n${text}`,
    );
  }
  return {
    udpPort,
    tcpPort,
    targets: { udp: `127.0.0.1:${udpPort}`, tcp: `127.0.0.1:${tcpPort}` },
    alive: () => !exited,
    log: () => text,
    stop,
  };
}
