"""The sweep's figure: test AUC and test logloss against embedding bytes, one style per method.

Every method has one fixed colour and marker (``METHOD_STYLES``), whatever the grid's order; MEC
and PQ (and AFM+MEC / AFM+PQ), which often land on the same bytes and AUC, get different colours
and markers and are drawn a few percent left / right of their true bytes.  Hollow markers (the
point before fine-tuning, joined to the filled one after) appear only where fine-tuning changed
the figure.  Labels are placed where they collide with no other label or marker (a leader line
joins a label pushed away from its point).  A few points far worse than the rest (e.g. a hashed
model trained small) are drawn on the panel's edge with their value in the label
(:func:`panel_scale`), so that they do not flatten the others.
"""

import math
import zlib
from dataclasses import dataclass
from typing import Any

from matplotlib.transforms import Bbox

# method -> (colour, marker); a method not listed gets a colour from its name and a circle
METHOD_STYLES: dict[str, tuple[str, str]] = {
    "afm": ("tab:blue", "o"),
    "svd": ("tab:orange", "v"),
    "mec": ("tab:green", "D"),
    "pq": ("yellowgreen", "s"),
    "afm+mec": ("tab:purple", "P"),
    "afm+pq": ("tab:pink", "X"),
    "int8": ("saddlebrown", "^"),
    "int4": ("peru", ">"),
    "int2": ("rosybrown", "<"),
    "fp16": ("goldenrod", "^"),
    "afm+int8": ("tab:gray", "d"),
    "afm+int4": ("slategray", "d"),
    "hash": ("tab:red", "h"),
    "qr": ("tab:cyan", "8"),
    "budget": ("black", "p"),
}
# methods that overlap another one: drawn at bytes x this factor (log axis), labelled at it too
X_NUDGE = {"mec": 0.95, "pq": 1.05, "afm+mec": 0.95, "afm+pq": 1.05, "hash": 0.975, "qr": 1.025}
_FALLBACK_COLORS = ("teal", "navy", "darkgoldenrod", "crimson", "indigo", "darkolivegreen")
LABEL_FONT = 6
MARKER_SIZE = 30


def method_style(method: str) -> tuple[str, str]:
    """The colour and marker of ``method`` (the same in every sweep)."""
    if method in METHOD_STYLES:
        return METHOD_STYLES[method]
    return _FALLBACK_COLORS[zlib.crc32(method.encode()) % len(_FALLBACK_COLORS)], "o"


def point_label(point: dict[str, Any]) -> str:
    """A point's short label on the plot: its parameters (``rank=8 M=2``), else its label
    (``int8``, ``hash 16.0x``); the colour and marker say the method."""
    params = point.get("params") or {}
    return " ".join(f"{k}={v}" for k, v in params.items()) or point["label"]


@dataclass(frozen=True)
class PanelScale:
    """One panel's y range: a point far worse than the rest (beyond ``limit``: below it for
    AUC, above it for logloss) is drawn on ``limit`` as a triangle pointing off the panel, its
    value in its label, so that a few very bad points do not flatten all the others."""

    key: str
    limit: float | None = None

    def clipped(self, value: float) -> bool:
        if self.limit is None:
            return False
        return value < self.limit if self.key == "auc" else value > self.limit

    def y(self, value: float) -> float:
        return self.limit if self.clipped(value) and self.limit is not None else value


def panel_scale(ok: list[dict[str, Any]], base: dict[str, Any], key: str) -> PanelScale:
    """Clip at the baseline -/+ max(2 % of it, 10 x the median distance of the points to it)."""
    b = base["test"][key]
    values = [p[w]["test"][key] for p in ok for w in ("before_finetune", "after_finetune")]
    if not values:
        return PanelScale(key)
    distances = sorted(abs(v - b) for v in values)
    window = max(0.02 * abs(b), 10 * distances[len(distances) // 2])
    scale = PanelScale(key, b - window if key == "auc" else b + window)
    return scale if any(scale.clipped(v) for v in values) else PanelScale(key)


def _xy(point: dict[str, Any], scale: PanelScale, when: str) -> tuple[float, float]:
    x = point["bytes"] * X_NUDGE.get(point["method"], 1.0)
    return x, scale.y(point[when]["test"][scale.key])


def _label(point: dict[str, Any], scale: PanelScale) -> str:
    value = point["after_finetune"]["test"][scale.key]
    return point_label(point) + (f" ({value:.3f})" if scale.clipped(value) else "")


def _draw_points(ax: Any, ok: list[dict[str, Any]], scale: PanelScale) -> None:
    """Each point after fine-tuning (filled); before it (hollow, joined) where they differ."""
    off = "v" if scale.key == "auc" else "^"
    for p in ok:
        color, marker = method_style(p["method"])
        (x, before), (_, after) = _xy(p, scale, "before_finetune"), _xy(p, scale, "after_finetune")
        if p["before_finetune"]["test"][scale.key] != p["after_finetune"]["test"][scale.key]:
            ax.plot([x, x], [before, after], color=color, lw=0.8, alpha=0.5, zorder=2)
            ax.scatter(x, before, marker=marker, facecolors="none", edgecolors=[color],
                       s=MARKER_SIZE, zorder=3)  # fmt: skip
        clipped = scale.clipped(p["after_finetune"]["test"][scale.key])
        ax.scatter(x, after, marker=off if clipped else marker, color=color, s=MARKER_SIZE,
                   zorder=4)  # fmt: skip
    if scale.limit is not None:
        ax.axhline(scale.limit, color="0.6", lw=0.6, ls="-.",
                   label="far worse points: on this line (▼ / ▲), value in label")  # fmt: skip


def _draw_front_and_baseline(
    ax: Any, ok: list[dict[str, Any]], base: dict[str, Any], scale: PanelScale
) -> None:
    front = sorted((p for p in ok if p.get(f"pareto_{scale.key}")), key=lambda p: p["bytes"])
    xs = [_xy(p, scale, "after_finetune")[0] for p in front]
    ys = [_xy(p, scale, "after_finetune")[1] for p in front]
    ax.scatter(xs, ys, s=120, facecolors="none", edgecolors="k", lw=0.8, zorder=5,
               label="on the Pareto front")  # fmt: skip
    if front:
        ax.step(xs, ys, where="post", color="0.3", lw=1.2, ls=":", label="Pareto front")
    ax.axhline(base["test"][scale.key], color="k", ls="--", lw=1, label="baseline (fp32)")
    ax.scatter(base["bytes"], base["test"][scale.key], marker="*", color="k", s=90, zorder=5)


def _legend(fig: Any, axes: Any, ok: list[dict[str, Any]]) -> None:
    """One legend for both panels, right of them (it covers no point or label)."""
    for method in dict.fromkeys(p["method"] for p in ok):
        color, marker = method_style(method)
        axes[0].scatter([], [], color=color, marker=marker, s=MARKER_SIZE, label=method)
    if any(p["before_finetune"] != p["after_finetune"] for p in ok):
        axes[0].scatter([], [], facecolors="none", edgecolors="0.4", s=MARKER_SIZE,
                        label="before fine-tuning (hollow)")  # fmt: skip
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=7)


def plot(sweep: dict[str, Any], path: str) -> None:
    """Test AUC and logloss against embedding bytes (log scale): one colour and marker per
    method, filled after fine-tuning, hollow before it (only where it changed something), the
    Pareto front of the points after fine-tuning as a step line and ringed markers, the fp32
    baseline as a dashed line and a black star; every point labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [p for p in sweep["points"] if p["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.2))
    scales = [panel_scale(ok, sweep["baseline"], key) for key in ("auc", "logloss")]
    for ax, scale, name in zip(axes, scales, ("test AUC", "test logloss"), strict=True):
        _draw_points(ax, ok, scale)
        _draw_front_and_baseline(ax, ok, sweep["baseline"], scale)
        ax.set_xscale("log")
        ax.set_xlabel("embedding bytes (tables only, log scale)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.25)
    _legend(fig, axes, ok)
    failed = len(sweep["points"]) - len(ok)
    fig.suptitle(
        f"{sweep['title']}: {len(ok)} points, baseline test AUC {sweep['baseline']['test']['auc']:.4f}"
        + (f", {failed} failed (see table)" if failed else ""),
        fontsize=10,
    )
    fig.tight_layout(rect=(0.0, 0.0, 0.83, 1.0))
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for ax, scale in zip(axes, scales, strict=True):
        place_labels(ax, renderer, [(*_xy(p, scale, "after_finetune"), _label(p, scale),
                                     method_style(p["method"])[0]) for p in ok])  # fmt: skip
    fig.savefig(path, dpi=100)
    plt.close(fig)


# label offsets tried, in points: nearest first, then further out (with a leader line)
_RADII = (6.0, 12.0, 19.0, 28.0, 40.0, 55.0)
_ANGLES = (45, -45, 135, -135, 0, 180, 90, -90, 20, -20, 160, -160, 65, -65, 115, -115)


def _candidate(
    px: float, py: float, w: float, h: float, r: float, angle: int, scale: float
) -> tuple[tuple[float, float], str, str, Bbox]:
    """Offset (points), alignment and display-space box of a label at ``r`` and ``angle``."""
    dx, dy = r * math.cos(math.radians(angle)), r * math.sin(math.radians(angle))
    ha = "left" if dx > 1e-9 else "right" if dx < -1e-9 else "center"
    va = "bottom" if dy > 1e-9 else "top" if dy < -1e-9 else "center"
    x0 = px + dx * scale - {"left": 0.0, "right": w, "center": w / 2}[ha]
    y0 = py + dy * scale - {"bottom": 0.0, "top": h, "center": h / 2}[va]
    return (dx, dy), ha, va, Bbox.from_bounds(x0, y0, w, h)


def place_labels(ax: Any, renderer: Any, items: list[tuple[float, float, str, str]]) -> None:
    """Annotate ``(x, y, text, colour)`` items so that no two labels overlap and no label covers
    a marker, where the candidates allow (else the least-overlapping candidate); a label moved
    away from its point gets a thin leader line."""
    scale = ax.figure.dpi / 72.0  # display pixels per point
    pixels = [ax.transData.transform((x, y)) for x, y, _, _ in items]
    markers = [Bbox.from_bounds(px - 6, py - 6, 12, 12) for px, py in pixels]  # ring included
    frame = ax.get_window_extent(renderer)
    placed: list[Any] = []
    for i in sorted(range(len(items)), key=lambda j: pixels[j][0]):
        x, y, text, color = items[i]
        probe = ax.text(0, 0, text, fontsize=LABEL_FONT)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        best: tuple[int, Any] | None = None
        for r in _RADII:
            for angle in _ANGLES:
                cand = _candidate(*pixels[i], extent.width, extent.height, r, angle, scale)
                box = cand[3]
                clashes = sum(box.overlaps(b) for b in placed) + sum(
                    box.overlaps(m) for j, m in enumerate(markers) if j != i
                )
                clashes += (
                    0 if frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) else 5
                )
                if best is None or clashes < best[0]:
                    best = (clashes, (r, cand))
            if best is not None and best[0] == 0:
                break
        assert best is not None
        r, ((dx, dy), ha, va, box) = best[1]
        placed.append(box)
        arrow = {"arrowstyle": "-", "lw": 0.4, "color": color} if r > _RADII[1] else None
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=LABEL_FONT,
                    ha=ha, va=va, color="0.15", arrowprops=arrow, zorder=6)  # fmt: skip
