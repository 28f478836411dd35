"""Cluster x provenance statistics: contingency table, purity, a heatmap PNG, a text table."""
from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np

from megatron_btm.utils.io import atomic_write_bytes


def contingency(labels_N: np.ndarray, provenance_N: np.ndarray, k: int, num_domains: int,
                weight_N: np.ndarray | None = None) -> np.ndarray:
    """[k, num_domains] int64: documents (or their total weight) of each provenance per cluster."""
    flat = np.asarray(labels_N, np.int64) * num_domains + np.asarray(provenance_N, np.int64)
    out = np.bincount(flat, weights=weight_N, minlength=k * num_domains)
    return np.rint(out).astype(np.int64).reshape(k, num_domains)


def purity(counts_KD: np.ndarray) -> float:
    """Fraction of documents whose cluster's majority provenance is their own: Σ_c max_d n_cd / N
    (with byte counts: the fraction of bytes in their cluster's majority-by-bytes provenance)."""
    total = counts_KD.sum()
    return float(counts_KD.max(axis=1).sum() / total) if total else float("nan")


def heatmap_png(path: str | os.PathLike, counts_KD: np.ndarray, clusters: Sequence[str],
                domains: Sequence[str], title: str) -> None:
    """Rows: clusters; columns: provenance; colour: share of the cluster's documents (count shown)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    K, D = counts_KD.shape
    share = counts_KD / np.maximum(counts_KD.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(3.0 + 0.8 * D, 2.0 + 0.35 * K), dpi=100)
    im = ax.imshow(share, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(D), labels=list(domains), rotation=45, ha="right")
    ax.set_yticks(range(K), labels=list(clusters))
    if K * D <= 40 * 40:
        for i in range(K):
            for j in range(D):
                if counts_KD[i, j]:
                    ax.text(j, i, str(int(counts_KD[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] < 0.6 else "black")
    ax.set_xlabel("provenance")
    ax.set_ylabel("cluster")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="share of the cluster")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no timestamp: same bytes
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def table(counts_KD: np.ndarray, clusters: Sequence[str], domains: Sequence[str]) -> str:
    """Markdown table: cluster, size, counts per provenance, majority provenance."""
    head = "| cluster | size | " + " | ".join(domains) + " | majority |"
    rows = [head, "|" + "---|" * (len(domains) + 3)]
    for name, row in zip(clusters, counts_KD):
        major = domains[int(row.argmax())] if row.sum() else "-"
        rows.append(f"| {name} | {int(row.sum())} | " + " | ".join(str(int(v)) for v in row)
                    + f" | {major} |")
    return "\n".join(rows)
