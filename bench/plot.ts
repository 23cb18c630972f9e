/**
 * Line charts as hand-written SVG (no dependencies), like the paper's figures.
 *
 * @module
 */

/** One line of a chart. */
export interface Series {
  /** Legend text. */
  name: string;
  /** Points as `[x, y]`, drawn in the given order. */
  points: [number, number][];
}

/** A chart to draw. */
export interface Chart {
  /** Title above the plot. */
  title: string;
  /** Label of the x axis. */
  xLabel: string;
  /** Label of the y axis. */
  yLabel: string;
  /** Lines. */
  series: Series[];
  /** Logarithmic y axis. @default false */
  logY?: boolean;
}

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"];

function esc(s: string): string {
  return s.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;");
}

function niceStep(span: number): number {
  const raw = span / 5;
  const mag = 10 ** Math.floor(Math.log10(raw || 1));
  const n = raw / mag;
  return (n <= 1 ? 1 : n <= 2 ? 2 : n <= 5 ? 5 : 10) * mag;
}

function fmt(v: number): string {
  if (Math.abs(v) >= 1e6) return `${+(v / 1e6).toPrecision(3)}M`;
  if (Math.abs(v) >= 1e3) return `${+(v / 1e3).toPrecision(3)}k`;
  return `${+v.toPrecision(3)}`;
}

/** Renders `chart` as a standalone SVG document (640 x 400). */
export function lineChart(chart: Chart): string {
  const W = 640, H = 400, L = 70, R = 170, T = 40, B = 50;
  const pts = chart.series.flatMap((s) => s.points).filter(([x, y]) =>
    Number.isFinite(x) && Number.isFinite(y) && (!chart.logY || y > 0)
  );
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const xMin = Math.min(0, ...xs), xMax = Math.max(1, ...xs);
  const ty = (v: number): number => (chart.logY ? Math.log10(v) : v);
  const yLo = chart.logY
    ? (ys.length ? Math.floor(Math.min(...ys.map(ty))) : 0)
    : Math.min(0, ...ys);
  const yHi = chart.logY ? Math.ceil(Math.max(...ys.map(ty), yLo + 1)) : Math.max(1, ...ys) * 1.05;
  const round = (v: number): number => Math.round(v * 10) / 10;
  const px = (x: number): number => round(L + ((x - xMin) / (xMax - xMin || 1)) * (W - L - R));
  const py = (y: number): number => round(H - B - ((ty(y) - yLo) / (yHi - yLo || 1)) * (H - T - B));
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2}" y="22" text-anchor="middle" font-size="15">${esc(chart.title)}</text>`,
  ];
  const xStep = niceStep(xMax - xMin);
  for (let x = Math.ceil(xMin / xStep) * xStep; x <= xMax + 1e-9; x += xStep) {
    out.push(
      `<line x1="${px(x)}" y1="${T}" x2="${px(x)}" y2="${H - B}" stroke="#eee"/>`,
      `<text x="${px(x)}" y="${H - B + 16}" text-anchor="middle">${fmt(x)}</text>`,
    );
  }
  if (chart.logY) {
    for (let e = yLo; e <= yHi; e++) {
      const y = 10 ** e;
      out.push(
        `<line x1="${L}" y1="${py(y)}" x2="${W - R}" y2="${py(y)}" stroke="#eee"/>`,
        `<text x="${L - 6}" y="${py(y) + 4}" text-anchor="end">${fmt(y)}</text>`,
      );
    }
  } else {
    const yStep = niceStep(yHi - yLo);
    for (let y = Math.ceil(yLo / yStep) * yStep; y <= yHi + 1e-9; y += yStep) {
      out.push(
        `<line x1="${L}" y1="${py(y)}" x2="${W - R}" y2="${py(y)}" stroke="#eee"/>`,
        `<text x="${L - 6}" y="${py(y) + 4}" text-anchor="end">${fmt(y)}</text>`,
      );
    }
  }
  out.push(
    `<rect x="${L}" y="${T}" width="${W - L - R}" height="${
      H - T - B
    }" fill="none" stroke="#333"/>`,
    `<text x="${(L + W - R) / 2}" y="${H - 12}" text-anchor="middle">${esc(chart.xLabel)}</text>`,
    `<text x="16" y="${(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 16 ${
      (T + H - B) / 2
    })">${esc(chart.yLabel)}</text>`,
  );
  chart.series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length]!;
    const ok = s.points.filter(([x, y]) =>
      Number.isFinite(x) && Number.isFinite(y) && (!chart.logY || y > 0)
    );
    if (ok.length) {
      const d = ok.map(([x, y], k) => `${k ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`);
      out.push(`<path d="${d.join(" ")}" fill="none" stroke="${color}" stroke-width="2"/>`);
      for (const [x, y] of ok) {
        out.push(
          `<circle cx="${px(x).toFixed(1)}" cy="${py(y).toFixed(1)}" r="3" fill="${color}"/>`,
        );
      }
    }
    const ly = T + 10 + i * 18;
    out.push(
      `<line x1="${W - R + 12}" y1="${ly}" x2="${
        W - R + 32
      }" y2="${ly}" stroke="${color}" stroke-width="2"/>`,
      `<text x="${W - R + 38}" y="${ly + 4}">${esc(s.name)}</text>`,
    );
  });
  out.push("</svg>");
  return out.join("\n") + "\n";
}
