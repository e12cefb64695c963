"""Charts of a run_all run, as PNG files in docs/: the targets (each measured
ratio against its target) and the latency distributions (raw, cold, warm).

Drawn from the figures the benchmarks hand back as JSON, so a chart always
shows the same run as the tables beside it. matplotlib comes with the bench
extra (`pip install -e '.[bench]'`); without it run_all writes the tables
and says the charts were not drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
TARGETS_PNG = "bench-targets.png"
LATENCY_PNG = "bench-latency.png"

GOOD, BAD, NEUTRAL = "#2e7d32", "#c62828", "#607d8b"


@dataclass(frozen=True)
class Target:
    """One measured ratio and the bound it must meet (`upper`: at most)."""

    label: str
    ratio: float
    bound: float
    upper: bool

    @property
    def met(self) -> bool:
        return self.ratio <= self.bound if self.upper else self.ratio >= self.bound


def targets(m: dict) -> list[Target]:
    """The ratio targets of issue 18 found in run_all's metrics."""
    out = []
    man, mcp, tp, fl = (m.get(k) for k in ("manager", "mcp", "throughput", "flood"))
    if man:
        out.append(Target("cold Manager.run / raw runsc", man["cold_ratio"], 0.90, True))
        out.append(Target("warm Manager.run / raw", man["warm_ratio"], 0.25, True))
    if mcp:
        out.append(Target("warm MCP call, settled pool / raw", mcp["warm_ratio"], 0.25, True))
        out.append(Target("warm MCP call, back to back / raw", mcp["b2b_ratio"], 0.25, True))
        out.append(Target("cold MCP call / raw", mcp["cold_ratio"], 1.25, True))
    if tp:
        out.append(Target("throughput at 8 concurrent / raw", tp["c8_ratio"], 1.0, False))
    if fl and "file_ratio" in fl:
        out.append(Target("100 MB flood / raw runsc to a file", fl["file_ratio"], 1.0, False))
    return out


def draw(m: dict, machine: str, outdir: Path = DOCS) -> list[Path]:
    """Write the charts for `m` (run_all's metrics); the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    written = []
    ts = targets(m)
    if ts:
        fig, ax = plt.subplots(figsize=(8, 0.55 * len(ts) + 1.6))
        ys = list(range(len(ts)))[::-1]
        for y, t in zip(ys, ts, strict=True):
            ax.barh(y, t.ratio, color=GOOD if t.met else BAD, height=0.6)
            ax.plot([t.bound, t.bound], [y - 0.4, y + 0.4], color="black", linewidth=2)
            sign = "<=" if t.upper else ">="
            ax.text(
                max(t.ratio, t.bound) + 0.02,
                y,
                f"{t.ratio:.2f}x (target {sign} {t.bound:.2f}x)",
                va="center",
                fontsize=8,
            )
        ax.set_yticks(ys, [t.label for t in ts], fontsize=8)
        ax.set_xlabel("ratio to raw `runsc run` measured in the same run (black tick: target)")
        ax.set_xlim(0, max(max(t.ratio for t in ts), max(t.bound for t in ts)) * 1.6)
        ax.set_title("Targets: green met, red not met", fontsize=10)
        written.append(_save(plt, fig, machine, outdir / TARGETS_PNG))

    panels = []
    if m.get("manager", {}).get("samples_ms"):
        s = m["manager"]["samples_ms"]
        panels.append(('Manager.run(["true"])', [("raw runsc", s["raw"]), ("cold", s["cold"]), ("warm", s["warm"])]))
    if m.get("mcp", {}).get("samples_ms"):
        s = m["mcp"]["samples_ms"]
        panels.append(
            (
                'execute_command("true") over MCP stdio',
                [
                    ("raw runsc", s["raw"]),
                    ("cold", s["cold"]),
                    ("warm, settled", s["warm"]),
                    ("warm, back to back", s["b2b"]),
                ],
            )
        )
    if panels:
        fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.3 * len(panels) + 0.8), squeeze=False)
        for ax, (title, series) in zip(axes[:, 0], panels, strict=True):
            labels = [name for name, _ in series]
            data = [xs for _, xs in series]
            ax.boxplot(data, vert=False, widths=0.5, showfliers=False)
            for i, xs in enumerate(data, start=1):
                jitter = [i + ((k * 37) % 21 - 10) / 60 for k in range(len(xs))]  # deterministic spread
                ax.scatter(xs, jitter, s=8, alpha=0.6, color=NEUTRAL)
            ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=8)
            ax.set_xscale("log")
            plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 3.0, 5.0)))
            ax.xaxis.set_minor_formatter(plain)
            ax.tick_params(axis="x", which="both", labelsize=7)
            ax.set_xlabel("milliseconds per call (log scale; box: quartiles and median, dots: every call)", fontsize=8)
            ax.set_title(title, fontsize=10)
        written.append(_save(plt, fig, machine, outdir / LATENCY_PNG))
    return written


def _save(plt, fig, machine: str, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """The machine line under the chart, then the PNG."""
    fig.text(0.01, 0.01, machine, fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
