r"""Source only, X -> Cityscapes, DeepLab-V2 ResNet-101: the lower rung.

    python -m plca_jax.main --config=configs/source_only.py:synthia \
      --workdir=DIR --config.data.source.root=/data/SYNTHIA \
      --config.data.eval.root=/data/cityscapes \
      --config.data.target.root=/data/cityscapes \
      --config.init_from=/data/weights/deeplab_r101_caffe

The argument is "gta5" or "synthia". PLCA's paper setting (configs/gta5.py,
configs/synthia.py: crops, schedule, optimizer) with CE on the source only
and evaluation without test-time aggregation; `--config.source_only.
use_lovasz=True` adds PLCA's Lovasz term (its Table 1's second rung).
The target stream is still read (the pipeline pairs the domains) but never
reaches the device. Published source-only DeepLab-V2 R101 figures depend on
the initialisation and the training length of each paper; compare runs of
this code with each other.
"""

from configs import gta5
from configs import synthia

SOURCES = {"gta5": gta5, "synthia": synthia}


def get_config(source="synthia"):
  """Source-only paper setting; `source` is "gta5" or "synthia"."""
  if source not in SOURCES:
    raise ValueError(f"config argument {source!r}; expected one of "
                     f"{sorted(SOURCES)}")
  config = SOURCES[source].get_config()
  config.method = "source_only"
  config.eval.aggregate = False
  return config
