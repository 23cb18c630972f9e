/**
 * Measurement helpers reading /proc: memory and CPU of a process tree, kernel memory
 * (slab, socket buffers), and facts about the machine for every result file.
 *
 * @module
 */

const CLK_TCK = 100; // Linux USER_HZ on every supported architecture

function readText(path: string): string | null {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return null;
  }
}

/** Parent pid and CPU ticks (its own and its reaped children's) from /proc/PID/stat. */
function statOf(pid: number): { ppid: number; ticks: number } | null {
  const s = readText(`/proc/${pid}/stat`);
  if (s === null) return null;
  // The command name is in parentheses and may contain spaces: split after the last ")".
  const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
  // utime + stime, plus cutime + cstime: children that exited (PostgreSQL backends, say)
  // keep counting in their parent, so a tree's total never goes down.
  return {
    ppid: Number(f[1]),
    ticks: Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]),
  };
}

/** `pid` and all its descendants (children, grandchildren, ...), alive now. */
export function processTree(pid: number): number[] {
  const children = new Map<number, number[]>();
  for (const e of Deno.readDirSync("/proc")) {
    const p = Number(e.name);
    if (!Number.isInteger(p)) continue;
    const st = statOf(p);
    if (!st) continue;
    const list = children.get(st.ppid) ?? [];
    list.push(p);
    children.set(st.ppid, list);
  }
  const out: number[] = [];
  const stack = [pid];
  while (stack.length) {
    const p = stack.pop()!;
    if (!readText(`/proc/${p}/stat`)) continue;
    out.push(p);
    for (const c of children.get(p) ?? []) stack.push(c);
  }
  return out;
}

/**
 * Pins every thread of `pid` and of its descendants to `cpus` (a `taskset` list such as "0" or
 * "1"); children forked later inherit it. Returns false if `taskset` failed for any of them.
 */
export async function pinTree(pid: number, cpus: string): Promise<boolean> {
  let ok = true;
  for (const p of processTree(pid)) {
    const out = await new Deno.Command("taskset", {
      args: ["-a", "-p", "-c", cpus, String(p)],
      stdout: "null",
      stderr: "null",
    }).output().catch(() => null);
    if (out === null || !out.success) ok = false;
  }
  return ok;
}

/** Memory of a process tree, in bytes. */
export interface TreeMemory {
  /** Processes counted. */
  pids: number;
  /** Sum of VmRSS (counts shared pages once per process that touched them). */
  rss_bytes: number;
  /** Sum of Pss (shared pages split between their users): the honest total for a tree. */
  pss_bytes: number;
}

function kbField(text: string | null, name: string): number {
  if (text === null) return 0;
  const m = text.match(new RegExp(`^${name}:\\s+(\\d+) kB`, "m"));
  return m ? Number(m[1]) * 1024 : 0;
}

/** RSS and PSS of `pid` and its descendants (/proc/PID/status, /proc/PID/smaps_rollup). */
export function treeMemory(pid: number): TreeMemory {
  let rss = 0, pss = 0, n = 0;
  for (const p of processTree(pid)) {
    n++;
    rss += kbField(readText(`/proc/${p}/status`), "VmRSS");
    pss += kbField(readText(`/proc/${p}/smaps_rollup`), "Pss");
  }
  return { pids: n, rss_bytes: rss, pss_bytes: pss };
}

/** Memory of several process trees (e.g. the load generator's workers). */
export function treesMemory(pids: number[]): TreeMemory {
  const out: TreeMemory = { pids: 0, rss_bytes: 0, pss_bytes: 0 };
  for (const p of pids) {
    const m = treeMemory(p);
    out.pids += m.pids;
    out.rss_bytes += m.rss_bytes;
    out.pss_bytes += m.pss_bytes;
  }
  return out;
}

/** CPU time (user + system) used so far by a process tree, in seconds. */
export function treeCpuSeconds(pid: number): number {
  let t = 0;
  for (const p of processTree(pid)) t += statOf(p)?.ticks ?? 0;
  return t / CLK_TCK;
}

/** Machine-wide CPU counters from /proc/stat, in seconds: busy and total over all cores. */
export function machineCpu(): { busy: number; total: number } {
  const line = (readText("/proc/stat") ?? "").split("\n")[0] ?? "";
  const v = line.trim().split(/\s+/).slice(1).map(Number);
  const total = v.reduce((a, b) => a + b, 0);
  const idle = (v[3] ?? 0) + (v[4] ?? 0);
  return { busy: (total - idle) / CLK_TCK, total: total / CLK_TCK };
}

/** Pid of the PostgreSQL postmaster (a `postgres` process whose parent is pid 1), or null. */
export function postgresPid(): number | null {
  for (const e of Deno.readDirSync("/proc")) {
    const p = Number(e.name);
    if (!Number.isInteger(p)) continue;
    const comm = readText(`/proc/${p}/comm`)?.trim();
    if (comm === "postgres" && statOf(p)?.ppid === 1) return p;
  }
  return null;
}

/**
 * Measures CPU over an interval: call it at the start, call the result at the end. Gives
 * the server tree's cores in use, PostgreSQL's (all of it, whoever its clients are) and the
 * whole machine's busy cores.
 */
export function cpuMeter(serverPid: number | null): () => CpuUse {
  const t0 = performance.now();
  const s0 = serverPid === null ? 0 : treeCpuSeconds(serverPid);
  const pg = postgresPid();
  const p0 = pg === null ? 0 : treeCpuSeconds(pg);
  const m0 = machineCpu();
  return () => {
    const wall = (performance.now() - t0) / 1000;
    const s1 = serverPid === null ? 0 : treeCpuSeconds(serverPid);
    const p1 = pg === null ? 0 : treeCpuSeconds(pg);
    const m1 = machineCpu();
    const round = (x: number): number => Math.round(x * 100) / 100;
    return {
      server_cores: serverPid === null ? null : round((s1 - s0) / wall),
      postgres_cores: pg === null ? null : round((p1 - p0) / wall),
      machine_busy_cores: round((m1.busy - m0.busy) / Math.max(1e-9, wall)),
      wall_s: round(wall),
    };
  };
}

/** CPU use over an interval, in cores (1 = one core fully busy). */
export interface CpuUse {
  /** The server's process tree. */
  server_cores: number | null;
  /** The PostgreSQL server (all its clients, not only ours). */
  postgres_cores: number | null;
  /** All processes on the machine. */
  machine_busy_cores: number;
  /** Length of the interval, s. */
  wall_s: number;
}

/** Kernel memory snapshot, bytes. */
export interface KernelMemory {
  /** /proc/meminfo Slab. */
  slab_bytes: number;
  /** /proc/meminfo SUnreclaim. */
  sunreclaim_bytes: number;
  /** /proc/net/sockstat TCP mem (socket buffers), pages converted to bytes. */
  tcp_buffer_bytes: number;
  /** TCP sockets in use (/proc/net/sockstat). */
  tcp_inuse: number;
  /** Bytes per slab cache (active objects x object size), when /proc/slabinfo is readable. */
  slabs: Record<string, number> | null;
}

/** Reads /proc/meminfo, /proc/net/sockstat and (if readable) /proc/slabinfo. */
export function kernelMemory(): KernelMemory {
  const mi = readText("/proc/meminfo");
  const ss = readText("/proc/net/sockstat") ?? "";
  const tcp = ss.match(/^TCP: inuse (\d+).* mem (\d+)/m);
  let slabs: Record<string, number> | null = null;
  const si = readText("/proc/slabinfo");
  if (si !== null) {
    slabs = {};
    for (const line of si.split("\n").slice(2)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 4 || f[0] === undefined) continue;
      slabs[f[0]] = Number(f[1]) * Number(f[3]);
    }
  }
  return {
    slab_bytes: kbField(mi, "Slab"),
    sunreclaim_bytes: kbField(mi, "SUnreclaim"),
    tcp_buffer_bytes: tcp ? Number(tcp[2]) * 4096 : 0,
    tcp_inuse: tcp ? Number(tcp[1]) : 0,
    slabs,
  };
}

/** Difference of two kernel snapshots; `slabs` keeps the `top` caches that grew most. */
export function kernelDelta(a: KernelMemory, b: KernelMemory, top = 8): KernelMemory {
  let slabs: Record<string, number> | null = null;
  if (a.slabs && b.slabs) {
    const d = Object.keys(b.slabs).map((k) =>
      [k, (b.slabs![k] ?? 0) - (a.slabs![k] ?? 0)] as const
    );
    d.sort((x, y) => y[1] - x[1]);
    slabs = Object.fromEntries(d.slice(0, top));
  }
  return {
    slab_bytes: b.slab_bytes - a.slab_bytes,
    sunreclaim_bytes: b.sunreclaim_bytes - a.sunreclaim_bytes,
    tcp_buffer_bytes: b.tcp_buffer_bytes - a.tcp_buffer_bytes,
    tcp_inuse: b.tcp_inuse - a.tcp_inuse,
    slabs,
  };
}

/** Facts about the machine and software, recorded in every result file. */
export interface MachineFacts {
  /** CPU model name. */
  cpu_model: string;
  /** Logical cores. */
  cores: number;
  /** Kernel release. */
  kernel: string;
  /** Deno version. */
  deno: string;
  /** Total memory, bytes. */
  memory_bytes: number;
  /** Hard limit on open files per process. */
  open_files_limit: number | null;
  /** Kamailio version line, if installed. */
  kamailio: string | null;
  /** SIPp version, if installed. */
  sipp: string | null;
  /** PostgreSQL client version, if installed. */
  postgres: string | null;
}

/** Runs a command and returns its output, or null if it cannot run. */
export async function commandOutput(cmd: string, args: string[]): Promise<string | null> {
  try {
    const o = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
    return new TextDecoder().decode(o.stdout) + new TextDecoder().decode(o.stderr);
  } catch {
    return null;
  }
}

/** Collects {@linkcode MachineFacts}. */
export async function machineFacts(): Promise<MachineFacts> {
  const cpu = readText("/proc/cpuinfo") ?? "";
  const limits = readText("/proc/self/limits") ?? "";
  const nofile = limits.match(/^Max open files\s+\d+\s+(\d+)/m);
  const kam = await commandOutput("kamailio", ["-v"]);
  const sipp = await commandOutput("sipp", ["-v"]);
  const pg = await commandOutput("psql", ["--version"]);
  return {
    cpu_model: cpu.match(/^model name\s*:\s*(.*)$/m)?.[1]?.trim() ?? "unknown",
    cores: navigator.hardwareConcurrency,
    kernel: (readText("/proc/sys/kernel/osrelease") ?? "unknown").trim(),
    deno: Deno.version.deno,
    memory_bytes: kbField(readText("/proc/meminfo"), "MemTotal"),
    open_files_limit: nofile ? Number(nofile[1]) : null,
    kamailio: kam?.match(/version: (.*)/)?.[1]?.trim() ?? null,
    sipp: sipp?.match(/SIPp (v[^\s]+)/)?.[1] ?? null,
    postgres: pg?.trim() || null,
  };
}
