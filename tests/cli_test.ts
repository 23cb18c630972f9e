/**
 * The command line of `main.ts`: help and version, and that each bad flag or value prints exactly
 * one line on stderr and exits with status 2 (a server that starts instead is killed and fails).
 */
import assert from "node:assert/strict";
import { mainCommand } from "./_server.ts";

interface Run {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
  /** Whether it had to be killed because it did not exit in time. */
  readonly timedOut: boolean;
}

/** Runs `main.ts` with `args`, killing it after `timeoutMs`. */
async function run(args: readonly string[], timeoutMs = 15_000): Promise<Run> {
  const { command, args: full } = mainCommand(args);
  const child = new Deno.Command(command, {
    args: full,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      child.kill("SIGKILL");
    } catch {
      // exited meanwhile
    }
  }, timeoutMs);
  const out = await child.output();
  clearTimeout(timer);
  const dec = new TextDecoder();
  return {
    code: out.code,
    stdout: dec.decode(out.stdout),
    stderr: dec.decode(out.stderr),
    timedOut,
  };
}

function lines(text: string): string[] {
  return text.split("\n").filter((l) => l.trim() !== "");
}

Deno.test("main.ts command line", async (t) => {
  await t.step("--version prints the version and exits 0", async () => {
    const r = await run(["--version"]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^citysip \d+\.\d+\.\d+/);
  });

  await t.step("--help lists the commands and exits 0", async () => {
    const r = await run(["--help"]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /\bserve\b/);
  });

  await t.step("serve --help lists every serve flag and exits 0", async () => {
    const r = await run(["serve", "--help"]);
    assert.equal(r.code, 0, r.stderr);
    for (
      const flag of [
        "--listen",
        "--domain",
        "--min-expires",
        "--max-expires",
        "--default-expires",
        "--log-level",
      ]
    ) {
      assert.ok(r.stdout.includes(flag), `serve --help mentions ${flag}`);
    }
  });

  const bad: ReadonlyArray<readonly [string[], RegExp]> = [
    [["serve", "--bogus"], /--bogus/],
    [["serve", "--listen", "foo"], /--listen/],
    [["serve", "--listen", "sctp:127.0.0.1:5060"], /--listen/],
    [["serve", "--min-expires", "abc"], /--min-expires/],
    [["serve", "--min-expires", "100", "--max-expires", "50"], /--m(in|ax)-expires/],
    [["serve", "--log-level", "loud"], /--log-level/],
    [["serve", "--db", "mysql://x"], /--db/],
    [["frobnicate"], /frobnicate/],
  ];
  await Promise.all(bad.map(([args, names]) =>
    t.step({
      name: `${args.join(" ")}: exactly one line on stderr and exit 2`,
      sanitizeOps: false,
      sanitizeResources: false,
      sanitizeExit: false,
      fn: async () => {
        const r = await run(args);
        assert.equal(r.timedOut, false, "it exited by itself");
        assert.equal(r.code, 2, r.stderr);
        const err = lines(r.stderr);
        assert.equal(err.length, 1, `stderr: ${JSON.stringify(r.stderr)}`);
        assert.match(err[0]!, names);
      },
    })
  ));

  for (const transport of ["tcp", "udp"] as const) {
    await t.step(
      `serve on a ${transport} port already in use: a clear error and a non-zero exit`,
      async () => {
        const blocker = transport === "tcp"
          ? Deno.listen({ hostname: "127.0.0.1", port: 0 })
          : Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
        const port = (blocker.addr as Deno.NetAddr).port;
        try {
          const r = await run([
            "serve",
            "--store",
            "memory",
            "--workers",
            "1",
            "--listen",
            `${transport}:127.0.0.1:${port}`,
          ]);
          assert.equal(r.timedOut, false, "it exited by itself");
          assert.notEqual(r.code, 0);
          const err = lines(r.stderr).filter((l) => !/level=(warn|info|debug)/.test(l));
          assert.equal(err.length, 1, `stderr: ${JSON.stringify(r.stderr)}`);
          assert.match(err[0]!, new RegExp(`${port}`));
          assert.match(err[0]!, /in use/i);
        } finally {
          blocker.close();
        }
      },
    );
  }
});
