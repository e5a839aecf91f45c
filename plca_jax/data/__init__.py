"""Datasets: on-disk sources, the synthetic domains, and the pipelines."""

from plca_jax.data.sources.cityscapes import Cityscapes
from plca_jax.data.sources.gta5 import GTA5
from plca_jax.data.sources.synthia import Synthia
from plca_jax.data.synthetic import SyntheticDomain

__all__ = ["Cityscapes", "GTA5", "Synthia", "SyntheticDomain"]
