"""A PNG of a replay's latency CDFs (TTFT, TPOT, ITL, end-to-end), one line per priority class."""

from __future__ import annotations

from pathlib import Path

from orchestrator.bench.stats import RequestRecord, Slo, e2e_s, itls_s, tpot_s, ttft_s


def _values_ms(records: list[RequestRecord], metric: str) -> list[float]:
    ok = [r for r in records if r.ok]
    if metric == "ITL":
        return sorted(g * 1000.0 for r in ok for g in itls_s(r))
    fn = {"TTFT": ttft_s, "TPOT": tpot_s, "E2E": e2e_s}[metric]
    return sorted(v * 1000.0 for v in map(fn, ok) if v is not None)


def plot_cdfs(path: str | Path, records: list[RequestRecord], slo: Slo, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")           # files only, no display
    import matplotlib.pyplot as plt

    classes = sorted({r.priority for r in records}, reverse=True)
    groups = {"all": records} if len(classes) == 1 else {f"priority {p}": [r for r in records if r.priority == p]
                                                         for p in classes}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    limits = {"TTFT": slo.ttft_ms, "TPOT": slo.tpot_ms}
    for ax, metric in zip(axes.flat, ("TTFT", "TPOT", "ITL", "E2E")):
        for label, group in groups.items():
            values = _values_ms(group, metric)
            if values:     # from 0 at the smallest value, so that a class of one request still shows
                ax.step([values[0], *values], [0.0, *((i + 1) / len(values) for i in range(len(values)))],
                        where="post", label=f"{label} (n={len(values)})")
        if limits.get(metric) is not None:
            ax.axvline(limits[metric], color="grey", linestyle="--", linewidth=1, label=f"SLO {limits[metric]:g} ms")
        ax.set_title(metric)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if metric != "ITL" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
