"""The PNG chart of a report: latency and throughput per batch size, and the cold start."""
from __future__ import annotations

from pathlib import Path


def series(report: dict) -> dict[str, dict[int, float]]:
    """Label -> {batch size: ms per batch} of every end-to-end path in the report."""
    dt = report["dtype"]
    e2e = report["end_to_end"]
    Bs = list(e2e)
    out = {f"ours {dt}": {B: e2e[B][f"{dt}_ms"] for B in Bs},
           "ours fp8": {B: e2e[B]["fp8_ms"] for B in Bs if "fp8_ms" in e2e[B]},
           "ours fp32 (reference)": {B: e2e[B]["fp32_ms"] for B in Bs if "fp32_ms" in e2e[B]}}
    for mode, label in (("diffusers", f"diffusers {dt}"), ("diffusers-compiled", f"diffusers {dt} + torch.compile")):
        if mode in report.get("isolated", {}):
            out[label] = {B: e["ms"] for B, e in report["isolated"][mode]["end_to_end"].items()}
    return out


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cold = report.get("cold_start") or {}
    runs = {who: min(r["to_png_s"] for r in cold[who]) for who in ("ours", "diffusers") if cold.get(who)}
    fig, axes = plt.subplots(1, 3 if runs else 2, figsize=(15 if runs else 10, 4))
    ax1, ax2 = axes[:2]
    for label, pts in series(report).items():
        pts = sorted(pts.items())
        if pts:
            ax1.plot(*zip(*[(b, v / 1e3) for b, v in pts]), "o-", label=label)
            ax2.plot(*zip(*[(b, 1e3 * b / v) for b, v in pts]), "o-", label=label)
    ax1.set(xlabel="batch size", ylabel="seconds per batch",
            title=f"end to end, {report['steps']} steps, {report['size']}²")
    ax2.set(xlabel="batch size", ylabel="images / s", title=report["device"])
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    if runs:   # best of the runs: page cache warm, so the spread is the host's noise
        ax3 = axes[2]
        bars = ax3.bar(list(runs), list(runs.values()), color=["tab:blue", "tab:red"][:len(runs)])
        ax3.bar_label(bars, fmt="%.1f s")
        n = min(len(cold[who]) for who in runs)
        ax3.set(ylabel="seconds", title=f"process start -> first PNG ({cold['size']}², {cold['steps']} steps, best of {n})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
