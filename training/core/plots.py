"""Figures people would rather look at than read: confusion matrices, learning curves, mistakes.

The one place that picks matplotlib's backend: figures are drawn off screen (servers, CI, workers). Modules that
draw figures of their own take ``plt`` from here.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_matrix_figure(matrix: np.ndarray, class_names: list[str], title: str):
    """Row-normalised colours (recall per class) with raw counts written in each cell."""
    n = len(class_names)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(matrix[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    ax.set_title(f"{title} (accuracy {np.trace(matrix) / max(matrix.sum(), 1):.3f})")
    fig.tight_layout()
    return fig


def learning_curves_figure(history: list, best_epoch: int, title: str):
    """Loss and accuracy per epoch from the engine's ``EpochResult`` history, the selected epoch marked."""
    epochs = [h.epoch for h in history]
    series = lambda key: [h.metrics[key] for h in history]  # noqa: E731
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, series("train_loss"), "o-", label="train")
    ax_loss.plot(epochs, series("val_loss"), "o-", label="val")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_acc.plot(epochs, series("train_acc"), "o-", label="train acc")
    ax_acc.plot(epochs, series("val_acc"), "o-", label="val acc")
    ax_acc.plot(epochs, series("val_auc"), "s--", label="val AUC")
    ax_acc.set_ylabel("score")
    for ax in (ax_loss, ax_acc):
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def reliability_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], bins: int, title: str):
    """Reliability diagram: accuracy against confidence in equal-width bins, one line per (probs, labels) pair,
    the diagonal being perfect calibration; beside it how many images fall in each bin."""
    fig, (ax, ax_count) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    edges = np.linspace(0, 1, bins + 1)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for label, (probs, labels) in curves.items():
        confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
        which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
        filled = [b for b in range(bins) if (which == b).any()]
        ax.plot(
            [confidence[which == b].mean() for b in filled],
            [correct[which == b].mean() for b in filled],
            "o-",
            label=label,
        )
        ax_count.bar(
            edges[:-1], np.bincount(which, minlength=bins), width=1 / bins, align="edge", alpha=0.5, label=label
        )
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax_count.set_yscale("log")
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("images")
    for a in (ax, ax_count):
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def mistakes_figure(
    images: np.ndarray, labels: np.ndarray, probs: np.ndarray, class_names: list[str], title: str, max_images: int = 16
):
    """The most confident wrong predictions: what the model is surest about and still gets wrong."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:max_images]
    cols = 4
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        image = images[i].transpose(1, 2, 0)
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"true: {class_names[labels[i]]}\npred: {class_names[predicted[i]]} ({probs[i, predicted[i]]:.2f})",
            fontsize=8,
        )
    if not len(wrong):
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


MAX_SCATTER_POINTS = 4000


def _scatter_by_class(ax, plane: np.ndarray, labels: np.ndarray, class_names: list[str], seed: int = 0):
    keep = np.random.default_rng(seed).permutation(len(plane))[:MAX_SCATTER_POINTS]
    colours = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for k, name in enumerate(class_names):
        points = plane[keep][labels[keep] == k]
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.6, color=colours(k), label=name)
    ax.legend(markerscale=3, fontsize=7, loc="best")


def pca_scatter_figure(plane: np.ndarray, labels: np.ndarray, class_names: list[str], explained, title: str):
    """Features projected on their first two principal components, one colour per class."""
    fig, ax = plt.subplots(figsize=(7, 6))
    _scatter_by_class(ax, plane, labels, class_names)
    ax.set_xlabel(f"PC 1 ({explained[0]:.0%} of the variance)")
    ax.set_ylabel(f"PC 2 ({explained[1]:.0%} of the variance)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def decision_regions_figure(estimator, plane: np.ndarray, labels: np.ndarray, class_names: list[str], title: str):
    """The class an estimator fitted on the 2-D plane predicts everywhere on it, with the points on top."""
    low, high = plane.min(axis=0), plane.max(axis=0)
    margin = 0.05 * (high - low)
    xs, ys = np.meshgrid(*(np.linspace(lo - m, hi + m, 300) for lo, hi, m in zip(low, high, margin)))
    regions = estimator.predict(np.c_[xs.ravel(), ys.ravel()]).reshape(xs.shape)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    ax.contourf(
        xs, ys, regions, levels=np.arange(len(class_names) + 1) - 0.5, cmap=cmap, alpha=0.25, vmin=0, vmax=cmap.N - 1
    )
    _scatter_by_class(ax, plane, labels, class_names)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def members_figure(names: list[str], weights, member_acc: dict, ensemble_acc: dict, title: str):
    """Validation and test accuracy of each member beside the ensemble's, with the members' weights."""
    labels = [f"{name}\nweight {w:.2f}" for name, w in zip(names, weights)] + ["ensemble"]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4.5))
    for offset, split in ((-0.2, "val"), (0.2, "test")):
        values = list(member_acc[split]) + [ensemble_acc[split]]
        bars = ax.bar(x + offset, values, 0.4, label=split)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    low = min(min(member_acc["val"]), min(member_acc["test"]))
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig


def robustness_figure(scores: np.ndarray, corruptions: list[str], clean: float, title: str):
    """Balanced accuracy per corruption (rows) and severity (columns), beside the clean score."""
    fig, ax = plt.subplots(figsize=(6.5, 0.42 * len(corruptions) + 1.8))
    image = ax.imshow(scores, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="balanced accuracy")
    ax.set_xticks(range(scores.shape[1]), [str(s + 1) for s in range(scores.shape[1])])
    ax.set_yticks(range(len(corruptions)), corruptions)
    ax.set_xlabel("severity")
    for i in range(scores.shape[0]):
        for j in range(scores.shape[1]):
            ax.text(j, i, f"{scores[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{title}\nclean balanced accuracy {clean:.3f}")
    fig.tight_layout()
    return fig


def gradcam_figure(
    images: np.ndarray, maps: np.ndarray, labels: np.ndarray, probs: np.ndarray, class_names: list[str], title: str
):
    """Each image beside its Grad-CAM overlay for the predicted class, mistakes first (a red caption). One mosaic
    drawn in one image: a subplot per picture cost a run about 2 s of CPU."""
    cols, gap, row_gap = 4, 2, 9  # image-overlay pairs per row; pixels between tiles, and between rows (captions)
    n, size = len(images), images.shape[-1]
    rows = max(1, int(np.ceil(n / cols)))
    tile = 2 * size + gap
    mosaic = np.ones((rows * (size + row_gap), cols * (tile + gap), 3))
    colours = plt.get_cmap("viridis")(maps)[..., :3] if n else None
    for k in range(n):
        grey = images[k].transpose(1, 2, 0) / 255.0
        picture = np.repeat(grey, 3, axis=-1) if grey.shape[-1] == 1 else grey
        overlay = 0.45 * picture + 0.55 * colours[k]
        top, left = (k // cols) * (size + row_gap), (k % cols) * (tile + gap)
        mosaic[top : top + size, left : left + size] = picture
        mosaic[top : top + size, left + size + gap : left + tile] = overlay
    fig, ax = plt.subplots(figsize=(cols * 2.6, rows * 1.6 + 0.6))
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    for k in range(n):
        predicted = int(probs[k].argmax())
        wrong = predicted != labels[k]
        ax.text(
            (k % cols) * (tile + gap),
            (k // cols) * (size + row_gap) + size + 0.5,
            f"{class_names[labels[k]][:18]} -> {class_names[predicted][:18]} ({probs[k, predicted]:.2f})",
            fontsize=6,
            va="top",
            color="firebrick" if wrong else "black",
        )
    fig.suptitle(
        f"{title}\n(each: image, Grad-CAM of the predicted class; true -> predicted, red: a mistake)", fontsize=8
    )
    fig.tight_layout()
    return fig
