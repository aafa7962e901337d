"""The PNG of a run: one panel per case group, a bar per competitor at each case, whiskers up to p90."""

import math
from pathlib import Path

from vgrt.bench.results import BenchRun, Case


def plot_run(run: BenchRun, path: Path) -> None:
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    groups: dict[str, list[Case]] = {}
    for case in run.output.cases:
        groups.setdefault(case.group, []).append(case)
    # Slots in the order of the fullest case (dense cases have fewer competitors), baseline first.
    fullest = sorted(run.output.cases, key=lambda case: -len(case.measurements))
    competitors = list(dict.fromkeys(m.competitor for case in fullest for m in case.measurements))
    cols = min(len(groups), 2)
    rows = math.ceil(len(groups) / cols)
    figure = Figure(figsize=(7 * cols, 3.2 * rows + 1.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(rows, cols, squeeze=False).flat)
    colors = {name: f"C{i % 10}" for i, name in enumerate(competitors)}
    width = 0.8 / len(competitors)
    for ax, (group, cases) in zip(axes, groups.items()):
        scale, unit = (1.0, "s") if max(m.p90_s for c in cases for m in c.measurements) >= 1 else (1e3, "ms")
        for i, name in enumerate(competitors):
            points = [(x, m) for x, case in enumerate(cases) for m in case.measurements if m.competitor == name]
            if not points:
                continue
            xs = [x + (i - (len(competitors) - 1) / 2) * width for x, _ in points]
            medians = [m.median_s * scale for _, m in points]
            above = [(m.p90_s - m.median_s) * scale for _, m in points]
            ax.bar(xs, medians, width, yerr=[[0] * len(above), above], color=colors[name], label=name, capsize=2)
        ax.set_xticks(range(len(cases)), [case.label for case in cases], fontsize=8)
        ax.set_ylabel(f"median time ({unit}), whisker: p90", fontsize=8)
        ax.set_title(group, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(groups) :]:  # the panels left over in the last row
        ax.set_visible(False)
    handles = [Patch(color=colors[name], label=name) for name in competitors]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(competitors), 6), fontsize=8)
    figure.suptitle(
        f"vgrt bench {run.settings.suite} ({run.output.label}) on {_device(run)}, {run.created}", fontsize=10
    )
    figure.savefig(path, dpi=100)


def _device(run: BenchRun) -> str:
    gpu = run.machine.get("gpu")
    if gpu:
        return gpu["name"]
    return f"{run.machine['cpu']}, {run.settings.threads} threads"
