"""The choices of LCC's and the trainer's settings, declared once (parsers read them: no heavy
import here).

>>> CLUSTER_METHODS, KNN_MODES
(('leiden', 'louvain', 'peer-pressure'), ('exact', 'approximate'))
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "CLASS_POLICIES",
    "CLUSTER_METHODS",
    "CORRECTIONS",
    "KNN_MODES",
    "LATENT_DTYPES",
    "METRICS",
    "POOLS",
    "PRECISIONS",
    "REFRESH_BN",
    "REFRESH_DEVICES",
    "SIMILARITIES",
    "SOURCES",
    "TARGET_MODES",
    "WEIGHTS",
    "ClusterMethod",
    "KnnMode",
    "Metric",
    "TargetMode",
    "Weights",
]

ClusterMethod = Literal["leiden", "louvain", "peer-pressure"]
TargetMode = Literal["exact", "approximate"]
KnnMode = Literal["exact", "approximate"]
Metric = Literal["l2", "cosine"]
Weights = Literal["unweighted", "rbf"]

CLUSTER_METHODS: tuple[str, ...] = ("leiden", "louvain", "peer-pressure")
TARGET_MODES: tuple[str, ...] = ("exact", "approximate")
KNN_MODES: tuple[str, ...] = ("exact", "approximate")
METRICS: tuple[str, ...] = ("l2", "cosine")
WEIGHTS: tuple[str, ...] = ("unweighted", "rbf")
#: the pull of a misclustered latent: plain (eq. 8) or its part orthogonal to its manifold (V.C)
CORRECTIONS: tuple[str, ...] = ("plain", "orthogonal")
#: latents of the fresh pass: BatchNorm running statistics, batch statistics, or recalibrated
REFRESH_BN: tuple[str, ...] = ("running", "batch", "recalibrate")
#: which classes a refresh corrects (:func:`lcc.engine.selection.select_classes`)
CLASS_POLICIES: tuple[str, ...] = ("all", "top-pairs", "heaviest-set", "largest-component")
#: how conv feature maps become one row per sample (:mod:`lcc.zoo.latents`)
POOLS: tuple[str, ...] = ("flatten", "avg", "max")
#: where a refresh's training-set latents come from (:class:`lcc.train.loop.Regularisation`)
SOURCES: tuple[str, ...] = ("fresh", "recorded")
#: dtypes of latents kept on disk (``latents_dir``)
LATENT_DTYPES: tuple[str, ...] = ("float32", "float16")
#: where a refresh's k-NN, PCA and targets run (:func:`lcc.engine.refresh.refresh`'s ``device``)
REFRESH_DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
#: edge similarity of a batch's latent geometry graph (:mod:`lcc.engine.lgg_graph`)
SIMILARITIES: tuple[str, ...] = ("auto", "cosine", "rbf")
#: Lightning's precision names offered by ``lcc train --precision``
PRECISIONS: tuple[str, ...] = ("32", "bf16-mixed", "16-mixed")
