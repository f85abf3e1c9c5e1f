"""`video-r2 plot RUN_DIR`: one PNG of a run's curves, read from its TensorBoard event files.

For people who want to glance at a run without starting TensorBoard (or on a machine without a browser):
loss, each reward, KL and completion length, one panel each, over optimizer steps.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from pathlib import Path

# Panels in this order; a tag is drawn in the first panel whose pattern it matches.
PANELS: list[tuple[str, list[str]]] = [
    ("loss", ["train/loss", "train/loss_step", "val/loss", "val/loss_epoch"]),
    ("rewards", ["train/reward", "train/rewards/*/mean"]),
    ("KL to the reference", ["train/kl"]),
    ("completion length (tokens)", ["train/completions/mean_length", "train/completions/*_length"]),
    ("learning rate", ["train/lr*", "lr-*"]),
]


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series under `run_dir` (every events file, any depth), as tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            series[tag] += [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return {tag: sorted(points) for tag, points in series.items()}


def _panel_of(tag: str) -> int | None:
    for i, (_, patterns) in enumerate(PANELS):
        if any(fnmatch.fnmatch(tag, p) for p in patterns):
            return i
    return None


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw loss, rewards, KL, completion length and learning rate of a run into one PNG.

    Args:
        run_dir: a run's log folder (anything containing TensorBoard `events.out.tfevents.*` files).
        out: the PNG to write; defaults to RUN_DIR/curves.png.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    series = read_scalars(run_dir)
    if not series:
        raise SystemExit(f"no TensorBoard scalars under {run_dir}; pass the run's log folder (it holds events.out.tfevents.* files)")
    panels: dict[int, list[str]] = defaultdict(list)
    for tag in sorted(series):
        if (i := _panel_of(tag)) is not None:
            panels[i].append(tag)
    if not panels:
        raise SystemExit(f"{run_dir} has scalars ({', '.join(sorted(series)[:5])}, ...) but none of loss, rewards, KL or length")

    shown = sorted(panels)
    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 2.6 * len(shown)), squeeze=False)
    for ax, i in zip(axes[:, 0], shown):
        for tag in panels[i]:
            steps, values = zip(*series[tag])
            ax.plot(steps, values, label=tag, marker="." if len(steps) < 30 else None)
        ax.set_title(PANELS[i][0])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return out


def plot_side_by_side(runs: dict[str, Path], out: Path) -> Path:
    """Two or more runs' reward curves side by side (one column per run, one row per reward, shared axes), so
    that an ablation reads at a glance: the demo draws GRPO with TAR next to GRPO without it.

    Args:
        runs: column title -> the run's log folder.
        out: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {title: read_scalars(Path(run_dir)) for title, run_dir in runs.items()}
    rewards = sorted({t for s in series.values() for t in s if fnmatch.fnmatch(t, "train/rewards/*/mean")})
    tags = rewards + ["train/reward/mean"]
    fig, axes = plt.subplots(len(tags), len(runs), figsize=(4.5 * len(runs), 2.2 * len(tags)),
                             squeeze=False, sharex=True, sharey="row")
    for column, (title, scalars) in enumerate(series.items()):
        axes[0, column].set_title(title)
        for row, tag in enumerate(tags):
            ax = axes[row, column]
            if scalars.get(tag):
                steps, values = zip(*scalars[tag])
                ax.plot(steps, values, marker="." if len(steps) < 30 else None)
            else:  # a reward this run does not compute (TAR, in the run without it)
                ax.text(0.5, 0.5, "not in this run's reward", ha="center", va="center", transform=ax.transAxes,
                        color="grey")
            ax.grid(alpha=0.3)
            if column == 0:
                ax.set_ylabel(tag.removeprefix("train/").removesuffix("/mean"), fontsize=8)
        axes[-1, column].set_xlabel("step")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return out
