"""Training methods: one module each, one small registry.

`get_method(config)` builds the method `config.method` names. To add one,
see `plca_jax/methods/base.py` and docs/methods.md, "Adding a method".
"""

from plca_jax.methods import adaptsegnet
from plca_jax.methods import base
from plca_jax.methods import dacs
from plca_jax.methods import fda
from plca_jax.methods import ldr
from plca_jax.methods import pixel_contrast
from plca_jax.methods import plca
from plca_jax.methods import source_only

METHODS = {
    "plca": plca.PLCA,
    "source_only": source_only.SourceOnly,
    "adaptsegnet": adaptsegnet.AdaptSegNet,
    "fda": fda.FDA,
    "pixel_contrast": pixel_contrast.PixelContrast,
    "ldr": ldr.LDR,
    "dacs": dacs.DACS,
}


def get_method(config):
  """The `base.Method` named by `config.method`."""
  name = config.method
  if name not in METHODS:
    raise ValueError(f"config.method={name!r} is not a method; expected one "
                     f"of {', '.join(sorted(METHODS))}")
  return METHODS[name](config)


def default_configs():
  """{method name: its config block} for the methods that have one."""
  blocks = {}
  for name, cls in METHODS.items():
    block = cls.default_config()
    if block is not None:
      blocks[name] = block
  return blocks


__all__ = ["METHODS", "base", "default_configs", "get_method"]
