"""Reporting of a compression sweep: the Pareto front, the markdown table and the plot.

``write_outputs`` writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` from the sweep's dict (as
``examples.dlrm.sweep`` builds it, or as ``--replot`` reads it back from ``sweep.json``).
"""

import json
import os
from collections.abc import Sequence
from typing import Any


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points ``(bytes, score)`` no other point beats, by increasing bytes.

    A point is beaten when another has no more bytes and a score at least as good, one of the
    two strictly.  Equal points are both kept.

    Args:
        points (Sequence[Tuple[float, float]]): ``(bytes, score)`` pairs.
        higher_is_better (bool): AUC: True; logloss: False.

    Example::

        >>> pareto_front([(100, 0.90), (10, 0.80), (50, 0.85), (60, 0.84), (10, 0.79)])
        [1, 2, 0]
        >>> pareto_front([(100, 0.3), (10, 0.5), (50, 0.6)], higher_is_better=False)
        [1, 0]
    """
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front: list[int] = []
    best, best_bytes = -float("inf"), None
    for i in order:
        size, score = points[i][0], sign * points[i][1]
        if score > best or (score == best and size == best_bytes):
            front.append(i)
            best, best_bytes = score, size
    return front


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def mark_pareto(points: list[dict[str, Any]]) -> None:
    """Set ``pareto_auc`` / ``pareto_logloss`` of every point (test split, after fine-tuning)."""
    ok = [p for p in points if p["status"] == "ok"]
    for key, higher in (("auc", True), ("logloss", False)):
        pairs = [(p["bytes"], p["after_finetune"]["test"][key]) for p in ok]
        front = set(pareto_front(pairs, higher_is_better=higher))
        for i, p in enumerate(ok):
            p[f"pareto_{key}"] = i in front
        for p in points:
            p.setdefault(f"pareto_{key}", False)


def _status(point: dict[str, Any]) -> str:
    kept = point.get("kept_tables", 0)
    notes = [f"{kept} tables kept"] if kept else []
    if "note" in point:
        notes.append(point["note"])
    return f"ok ({'; '.join(notes)})" if notes else "ok"


def markdown_table(sweep: dict[str, Any]) -> str:
    """The sweep as a markdown table: one row per point, the baseline first.

    NE is TorchRec's normalized entropy (``examples.dlrm.metrics``); a ``sweep.json`` written
    before it was reported shows ``—`` there.
    """
    base = sweep["baseline"]
    lines = [
        "| point | embedding bytes | × smaller | test AUC before FT | test AUC after FT "
        "| test logloss after FT | test NE after FT | val AUC after FT | Pareto (AUC) | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:-:|---|",
        f"| baseline (fp32) | {human_bytes(base['bytes'])} | 1 | {base['test']['auc']:.4f} "
        f"| {base['test']['auc']:.4f} | {base['test']['logloss']:.4f} "
        f"| {_fmt(base['test'].get('ne'), '.4f')} | {base['val']['auc']:.4f} | | ok |",
    ]
    for p in sweep["points"]:
        if p["status"] != "ok":
            error = p["error"].replace("|", "\\|").replace("\n", " ")[:200]
            lines.append(f"| {p['label']} | — | — | — | — | — | — | — | | **failed**: {error} |")
            continue
        before, after = p["before_finetune"], p["after_finetune"]
        lines.append(
            f"| {p['label']} | {human_bytes(p['bytes'])} | {base['bytes'] / max(p['bytes'], 1):.1f} "
            f"| {before['test']['auc']:.4f} | {after['test']['auc']:.4f} "
            f"| {after['test']['logloss']:.4f} | {_fmt(after['test'].get('ne'), '.4f')} "
            f"| {after['val']['auc']:.4f} | {'★' if p['pareto_auc'] else ''} | {_status(p)} |"
        )
    return "\n".join(lines) + "\n"


def plot(sweep: dict[str, Any], path: str) -> None:
    """Test AUC and logloss against embedding bytes (log scale): hollow markers before
    fine-tuning, filled after, the Pareto front of the points after fine-tuning as a step line,
    the fp32 baseline as a dashed line and a black star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = sweep["baseline"]
    ok = [p for p in sweep["points"] if p["status"] == "ok"]
    methods = list(dict.fromkeys(p["method"] for p in ok))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, name in zip(axes, ("auc", "logloss"), ("test AUC", "test logloss"), strict=True):
        for p in ok:
            color = colors[p["method"]]
            before, after = p["before_finetune"]["test"][key], p["after_finetune"]["test"][key]
            ax.plot([p["bytes"]] * 2, [before, after], color=color, lw=0.8, alpha=0.5)
            ax.scatter(p["bytes"], before, facecolors="none", edgecolors=[color], s=28)
            ax.scatter(p["bytes"], after, color=color, s=28)
            short = " ".join(f"{k}={v}" for k, v in p["params"].items())
            if short:
                ax.annotate(short, (p["bytes"], after), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
        front = sorted((p for p in ok if p[f"pareto_{key}"]), key=lambda p: p["bytes"])
        ax.scatter([p["bytes"] for p in front], [p["after_finetune"]["test"][key] for p in front],
                   s=110, facecolors="none", edgecolors="k", lw=0.8, label="on the Pareto front")  # fmt: skip
        if front:
            ax.step([p["bytes"] for p in front], [p["after_finetune"]["test"][key] for p in front],
                    where="post", color="0.3", lw=1.2, ls=":", label="Pareto front (after FT)")  # fmt: skip
        ax.axhline(base["test"][key], color="k", ls="--", lw=1, label="baseline (fp32)")
        ax.scatter(base["bytes"], base["test"][key], marker="*", color="k", s=90, zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("embedding bytes (tables only, log scale)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.25)
    for m in methods:
        axes[0].scatter([], [], color=colors[m], s=28, label=m)
    axes[0].scatter([], [], facecolors="none", edgecolors="0.4", s=28, label="before fine-tuning")
    axes[0].scatter([], [], color="0.4", s=28, label="after fine-tuning")
    axes[0].legend(fontsize=7, loc="lower right")
    failed = len(sweep["points"]) - len(ok)
    fig.suptitle(
        f"{sweep['title']}: {len(ok)} points"
        + (f", {failed} failed (see table)" if failed else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(sweep: dict[str, Any], out: str) -> None:
    """``sweep.json``, ``sweep.md`` and ``sweep.png`` in ``out`` (rank 0)."""
    mark_pareto(sweep["points"])
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(sweep, f, indent=2, default=str)
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write(markdown_table(sweep))
    plot(sweep, os.path.join(out, "sweep.png"))
