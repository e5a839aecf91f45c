"""Model registry: one small dict from name to class, and `get_model`."""

import jax.numpy as jnp

from plca_jax.models.deeplab_v2 import DeepLabV2
MODELS = {"deeplab_v2": DeepLabV2}


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Choices of config.model by platform -> the model's field (None: by the
# platform of the program being built).
FORMS = {"scan_blocks": ("scan_blocks", {"auto": None, "scan": True,
                                         "unroll": False}),
         "head_form": ("head_form", {"auto": None, "product": "product",
                                     "taps": "taps", "conv": "conv"})}


def get_model(config, dtype=None):
  """Builds the model named by `config.model.name` from `config.model`.

  The compute dtype is `dtype` if given, else `config.train.compute_dtype`.
  The forms of the network chosen by platform (block barriers, weight
  gradients and the head as matrix products) are left to the platform of
  the program that traces it (`plca_jax.xla.target_platform`).
  """
  if config.model.name not in MODELS:
    raise ValueError(f"config.model.name={config.model.name!r}; expected one "
                     f"of {sorted(MODELS)}")
  kwargs = dict(num_classes=config.model.num_classes,
                depth=config.model.depth, width=config.model.width,
                remat=config.model.remat,
                stride_on=config.model.stride_on,
                head_init=config.model.head_init)
  for key, (field, choices) in FORMS.items():
    choice = config.model.get(key, "auto")
    if choice not in choices:
      raise ValueError(f"config.model.{key}={choice!r}; expected one of "
                       f"{sorted(choices)}")
    kwargs[field] = choices[choice]
  if dtype is None:
    name = config.train.compute_dtype
    if name not in DTYPES:
      raise ValueError(f"config.train.compute_dtype={name!r}; expected one "
                       f"of {sorted(DTYPES)}")
    dtype = DTYPES[name]
  kwargs["dtype"] = dtype
  return MODELS[config.model.name](**kwargs)
