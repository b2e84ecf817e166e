"""loss.png: loss (top) and grad norm (bottom, log scale) over iterations, spikes and skips marked,
rolled-back ranges shaded. Agg backend: no display needed, same pixels everywhere."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ACTION_STYLE = {"skip": ("tab:orange", "o"), "rollback": ("tab:purple", "s"),
                "warn": ("tab:red", "x"), "stop": ("black", "X")}


def _number(v) -> float:
    return float(v) if isinstance(v, (int, float)) else np.nan  # None or a stray string: a gap


def _array(values) -> np.ndarray:
    return np.array([_number(v) for v in values], dtype=float)


def _top_limit(values: np.ndarray) -> float | None:
    """Upper y limit that keeps the training curve readable: a spike 100x the loss would flatten
    it, so values far above the bulk are clipped and drawn as markers on the top edge instead."""
    ok = values[np.isfinite(values)]
    if ok.size == 0:
        return None
    bulk = np.percentile(ok, 99)
    low = ok.min()
    cap = bulk + 3 * (bulk - low) if bulk > low else bulk * 2 + 1
    return float(min(ok.max(), cap)) * 1.05 if ok.max() > 0 else None


def _mark_over(ax, xs, ys, top, color) -> bool:
    """Points above the axis or non-finite: triangles on the top edge (axes coordinates)."""
    over = [x for x, y in zip(xs, ys) if y is None or not math.isfinite(y) or (top is not None and y > top)]
    if over:
        ax.scatter(over, [0.97] * len(over), marker="^", color=color, s=40, zorder=5,
                   transform=ax.get_xaxis_transform(), clip_on=False)
    return bool(over)


def figure(report: dict):
    s = report["series"]
    it = np.array(s["iteration"], dtype=float)
    loss, grad = _array(s["loss"]), _array(s["grad_norm"])
    fig, (ax_loss, ax_grad) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True,
                                           gridspec_kw={"height_ratios": [3, 2]})
    ax_loss.plot(it, np.where(np.isfinite(loss), loss, np.nan), color="tab:blue", lw=1, label="train loss")
    if s["val_iteration"]:
        ax_loss.plot(s["val_iteration"], _array(s["val_loss"]), "o-", color="tab:green", ms=3, lw=1,
                     label="val loss")
    positive = np.where(np.isfinite(grad) & (grad > 0), grad, np.nan)
    ax_grad.plot(it, positive, color="tab:gray", lw=1, label="grad norm")
    if np.isfinite(positive).any():
        ax_grad.set_yscale("log")

    top = _top_limit(np.concatenate([loss, _array(s["val_loss"])]))
    if top is not None:
        ax_loss.set_ylim(top=top)
    skipped = [i for i, k in zip(s["iteration"], s["skipped"]) if k]
    if skipped:  # one collection, not one artist per skip: long runs can skip thousands of steps
        for ax in (ax_loss, ax_grad):
            ax.vlines(skipped, 0, 1, transform=ax.get_xaxis_transform(), color="tab:orange", alpha=0.3,
                      lw=0.8, label="skipped step" if ax is ax_loss else None)
    for rb in report["rollbacks"]:
        if rb.get("to_iteration") is not None and rb.get("iteration") is not None:
            for ax in (ax_loss, ax_grad):
                ax.axvspan(rb["to_iteration"], rb["iteration"], color="tab:purple", alpha=0.12, lw=0,
                           label="rolled back" if ax is ax_loss and rb is report["rollbacks"][0] else None)

    off_scale = False
    for action, (color, marker) in ACTION_STYLE.items():
        group = [sp for sp in report["spikes"] if sp["action"] == action]
        if not group:
            continue
        xs = [sp["iteration"] for sp in group]
        ys = [sp["loss"] for sp in group]
        shown = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y) and (top is None or y <= top)]
        # An empty scatter carries the legend entry, so a group drawn only as triangles has one too.
        ax_loss.scatter([], [], marker=marker, color=color, label=f"spike: {action} ({len(group)})",
                        facecolors="none" if marker in "os" else None)
        if shown:
            ax_loss.scatter(*zip(*shown), marker=marker, color=color, s=40, zorder=5,
                            facecolors="none" if marker in "os" else None)
        off_scale |= _mark_over(ax_loss, xs, ys, top, color)
        gs = [(sp["iteration"], sp["grad_norm"]) for sp in group
              if sp["grad_norm"] is not None and math.isfinite(sp["grad_norm"]) and sp["grad_norm"] > 0]
        if gs:
            ax_grad.scatter(*zip(*gs), marker=marker, color=color, s=30, zorder=5,
                            facecolors="none" if marker in "os" else None)
        off_scale |= _mark_over(ax_grad, xs, [sp["grad_norm"] if sp["grad_norm"] is None or sp["grad_norm"] > 0
                                              else 1.0 for sp in group], None, color)
    if off_scale:
        ax_loss.scatter([], [], marker="^", color="gray", label="non-finite or off scale")

    summary = report["summary"]
    ax_loss.set_title(f"{report['log_dir']}: {summary['spikes']} spikes, {summary['skipped_iterations']} skipped, "
                      f"{summary['rollbacks']} rollback(s)", fontsize=10)
    ax_loss.set_ylabel("loss")
    ax_grad.set_ylabel("grad norm")
    ax_grad.set_xlabel("iteration")
    for ax in (ax_loss, ax_grad):
        ax.grid(alpha=0.3)
    ax_loss.legend(loc="upper right", fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def render_png(report: dict, dpi: int = 100) -> bytes:
    fig = figure(report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
