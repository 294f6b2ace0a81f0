"""The profile's PNG: prefill and decode throughput and memory against context length, log axes.

matplotlib is optional (``pip install hydra-edge[plot]``) and imported only here.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .measure import STATUS_MEMORY, BundleProfile
from .report import format_length

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
# short labels for lengths that have no measurement, written at the bottom of the panel
STATUS_LABELS = {"timeout": "timeout", "out of memory bound": "over memory bound", "failed": "failed"}


def check_plot_available(path: Path | None = None) -> None:
    """Raise UsageError unless matplotlib can be imported and ``path``, if given, names a PNG file."""
    if path is not None and path.suffix.lower() != ".png":
        raise UsageError(f"--plot {path} must name a .png file")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("matplotlib is not installed; install hydra-edge[plot] for --plot") from None


def _figure():
    check_plot_available()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _mark_missing(ax, length: int, text: str, color: str, row: int, *, last: bool) -> None:
    """Write ``text`` at ``length`` near the bottom of ``ax``, one row per bundle so labels do not overlap."""
    y = 0.03 + 0.07 * row
    ax.plot([length], [y], marker="x", color=color, transform=ax.get_xaxis_transform(), linestyle="none")
    # the label of the longest length goes to the left of its mark, inside the panel
    ax.annotate(text, xy=(length, y), xycoords=ax.get_xaxis_transform(), xytext=(-6 if last else 6, -3),
                textcoords="offset points", color=color, fontsize=8, ha="right" if last else "left")


def plot_profiles(profiles: list[BundleProfile], path: Path, *, title: str = "") -> None:
    """Write a PNG with three panels: prefill tok/s, decode tok/s and memory (MiB) per context length."""
    from matplotlib.ticker import NullLocator

    fig = _figure()
    axes = fig.subplots(1, 3)
    lengths = sorted({r.length for p in profiles for r in p.results})
    panels = [(axes[0], "prefill_tps", "prefill (tokens/s)"), (axes[1], "decode_tps", "decode (tokens/s)")]
    measured = {id(ax): False for ax in axes}

    for row, (profile, color) in enumerate(zip(profiles, COLORS)):
        # 1. throughput: a line through the measured points, a label where a length has none
        for ax, key, _ in panels:
            points = [(r.length, getattr(r, key)) for r in profile.results if getattr(r, key)]
            if points:
                ax.plot(*zip(*points), marker="o", color=color, label=profile.label)
                measured[id(ax)] = True
            for r in profile.results:
                if key == "decode_tps" and r.decode_state == "filled" and r.decode_tps:
                    ax.plot([r.length], [r.decode_tps], marker="o", markersize=11, markerfacecolor="none",
                            color=color, linestyle="none")
                if not getattr(r, key):
                    _mark_missing(ax, r.length, STATUS_LABELS.get(r.status, r.status), color, row,
                                  last=r.length == lengths[-1])

        # 2. memory: peak RSS solid, private memory (USS) at the end dashed, for every run that finished
        ax = axes[2]
        finished = [r for r in profile.results if r.uss_mib is not None and r.status != STATUS_MEMORY]
        peak = [(r.length, r.peak_rss_mib) for r in finished]
        uss = [(r.length, r.uss_mib) for r in finished]
        if peak:
            ax.plot(*zip(*peak), marker="o", color=color, label=f"{profile.label} peak RSS")
            measured[id(ax)] = True
        if uss:
            ax.plot(*zip(*uss), marker="s", linestyle="--", color=color, label=f"{profile.label} USS")
        for r in profile.results:
            if not any(r is f for f in finished):
                _mark_missing(ax, r.length, STATUS_LABELS.get(r.status, r.status), color, row,
                              last=r.length == lengths[-1])

    for ax, _, ylabel in panels + [(axes[2], None, "memory (MiB)")]:
        ax.set_xscale("log", base=2)
        if measured[id(ax)]:
            ax.set_yscale("log")
        else:
            # a log axis needs at least one positive value
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no measurement", transform=ax.transAxes, ha="center", color="gray")
        ax.set_xticks(lengths, [format_length(n) for n in lengths])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        if ax.has_data() and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if any(r.decode_state == "filled" for p in profiles for r in p.results):
        axes[1].set_title("circled: decode on a context filled to the length (prefill timed out)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
