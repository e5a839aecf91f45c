"""PLCA's losses: the objective and the loss functions it is made of.

Modules: `objective` (the PLCA objective, `total_loss`), `segmentation`
(CE, Lovasz-softmax, LSR, label resampling), `association` (the cycle
association; `aggregation`, `cos_cycle`, `kl_cycle` and `similarity` are its
parts, `association_stats` its diagnostics), `contrastive` and `gan` (other
methods' losses). This file only exports.
"""

from plca_jax.losses.aggregation import spatial_aggregate
from plca_jax.losses.association import association_loss
from plca_jax.losses.association import cycle_association
from plca_jax.losses.association_stats import association_confusion
from plca_jax.losses.association_stats import association_statistics
from plca_jax.losses.objective import plca_objective
from plca_jax.losses.objective import total_loss
from plca_jax.losses.segmentation import cross_entropy
from plca_jax.losses.segmentation import downsample_labels
from plca_jax.losses.segmentation import host_sort_of
from plca_jax.losses.segmentation import lovasz_softmax
from plca_jax.losses.segmentation import lsr_loss
from plca_jax.losses.segmentation import upsample_bilinear
from plca_jax.losses.similarity import at_least_f32
from plca_jax.losses.similarity import chunk_for
from plca_jax.losses.similarity import contrast_normalize

__all__ = [
    "association_confusion", "association_loss", "association_statistics",
    "at_least_f32", "chunk_for", "contrast_normalize", "cross_entropy",
    "cycle_association", "downsample_labels", "host_sort_of",
    "lovasz_softmax", "lsr_loss", "plca_objective", "spatial_aggregate",
    "total_loss", "upsample_bilinear",
]
