r"""pixel_contrast on the demo domains: the two-stage recipe.

    # All of it, one command (the three steps below, one folder each):
    python -m plca_jax.recipes --recipe=pixel_contrast \
      --config=configs/pixel_contrast.py --workdir=/tmp/pc

    # Stage 1: grayscale, CE on the source + entropy on the target.
    python -m plca_jax.main --config=configs/pixel_contrast.py:stage1 \
      --workdir=/tmp/pc_stage1
    # Its target pseudo-labels (class-wise thresholds of the one model).
    python -m plca_jax.methods.mbt --config=configs/pixel_contrast.py:stage1 \
      --workdirs=/tmp/pc_stage1 --out=/tmp/pc_pseudo
    # Stage 2: stylised source CE + entropy + pixel contrast, from scratch.
    python -m plca_jax.main --config=configs/pixel_contrast.py:stage2 \
      --workdir=/tmp/pc_stage2 \
      --config.pixel_contrast.pseudo_label_dir=/tmp/pc_pseudo

The network, data and schedule are configs/demo.py's; the method is
`plca_jax/methods/pixel_contrast.py`. Evaluation without PLCA's test-time
aggregation (the method's own protocol).
"""

from configs import demo


def get_config(stage="stage1"):
  """`stage` is "stage1" (grayscale) or "stage2" (needs pseudo_label_dir)."""
  if stage not in ("stage1", "stage2"):
    raise ValueError(f"config argument {stage!r}; expected stage1 or stage2")
  config = demo.get_config()
  config.method = "pixel_contrast"
  config.eval.aggregate = False
  config.data.grayscale = stage == "stage1"
  return config
