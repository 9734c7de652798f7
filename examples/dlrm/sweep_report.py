"""Reporting of a compression sweep: the Pareto front, the markdown table and the plot.

``write_outputs`` writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` from the sweep's dict (as
``examples.dlrm.sweep`` builds it, or as ``--replot`` reads it back from ``sweep.json``).
"""

import json
import os
from collections.abc import Sequence
from typing import Any

from examples.dlrm.sweep_plot import plot

DATASET_TITLES = {"synthetic": "Synthetic", "frappe": "Frappe", "criteo": "Criteo"}
ARCH_TITLES = {"dlrm": "DLRM", "dcn": "DLRM-DCN", "dense_only": "dense-only MLP"}


def default_title(dataset: str, data_path: str | None, arch: str, embedding_dim: int) -> str:
    """The plot's title from the data set and the model, e.g. ``'Frappe, DLRM d=16'``; a parquet
    data set is named by its directory."""
    name = DATASET_TITLES.get(dataset, dataset)
    if dataset == "parquet" and data_path:
        name = f"parquet {os.path.basename(os.path.normpath(data_path))}"
    return f"{name}, {ARCH_TITLES.get(arch, arch)} d={embedding_dim}"


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


def _delta(value: float, base: float) -> str:
    return f"{value - base:+.5f}"


def markdown_table(sweep: dict[str, Any]) -> str:
    """The sweep as a markdown table: one row per point, the baseline first.

    ``Δ test AUC`` is the test AUC after fine-tuning minus the baseline's, to 5 digits.  NE is
    TorchRec's normalized entropy (``examples.dlrm.metrics``); a ``sweep.json`` written before it
    was reported shows ``—`` there.
    """
    base = sweep["baseline"]
    base_auc = base["test"]["auc"]
    lines = [
        "| point | embedding bytes | × smaller | test AUC before FT | test AUC after FT "
        "| Δ test AUC | test logloss after FT | test NE after FT | val AUC after FT "
        "| Pareto (AUC) | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|---|",
        f"| baseline (fp32) | {human_bytes(base['bytes'])} | 1 | {base_auc:.4f} "
        f"| {base_auc:.4f} | 0 | {base['test']['logloss']:.4f} "
        f"| {_fmt(base['test'].get('ne'), '.4f')} | {base['val']['auc']:.4f} | | ok |",
    ]
    for p in sweep["points"]:
        if p["status"] != "ok":
            error = p["error"].replace("|", "\\|").replace("\n", " ")[:200]
            lines.append(
                f"| {p['label']} | — | — | — | — | — | — | — | — | | **failed**: {error} |"
            )
            continue
        before, after = p["before_finetune"], p["after_finetune"]
        lines.append(
            f"| {p['label']} | {human_bytes(p['bytes'])} | {base['bytes'] / max(p['bytes'], 1):.1f} "
            f"| {before['test']['auc']:.4f} | {after['test']['auc']:.4f} "
            f"| {_delta(after['test']['auc'], base_auc)} "
            f"| {after['test']['logloss']:.4f} | {_fmt(after['test'].get('ne'), '.4f')} "
            f"| {after['val']['auc']:.4f} | {'★' if p['pareto_auc'] else ''} | {_status(p)} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(sweep: dict[str, Any], out: str) -> None:
    """``sweep.json``, ``sweep.md`` and ``sweep.png`` in ``out`` (rank 0)."""
    mark_pareto(sweep["points"])
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(sweep, f, indent=2, default=str)
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write(markdown_table(sweep))
    plot(sweep, os.path.join(out, "sweep.png"))
