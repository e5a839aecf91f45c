"""The ASPP head alone, compiled for a TPU or GPU target in each form.

    python benchmarks/aspp_head.py --target=tpu-v5e-8 [--classes=16] \\
        [--forms=taps,product,conv] [--markdown]

Compiles the forward and backward pass of DeepLab-V2's head (four dilated
3x3 convolutions, 2048 channels to `--classes`, rates 6, 12, 18 and 24)
for one image at the paper's 730x730 crop (a 92x92 feature map), on one
device of `--target`, in each form of `config.model.head_form` (`conv`:
four convolutions; `product`: one matrix product and shifted adds; `taps`:
one product per tap, batched, and shifted adds), and prints the compile
time and the compiler's cost analysis (the host's for GPU) of each. No accelerator is needed (plca_jax.aot's devices; its wheels).
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import report
from plca_jax import aot  # sets up the AOT wheels' path

sys.path.insert(0, aot.AOT_WHEELS)
import jax
import jax.numpy as jnp

from plca_jax.models import deeplab_v2



def compile_head(target, form, classes, size=92, channels=2048):
  """(seconds, {"flops", "bytes"}) of the head's forward and backward."""
  device = aot.target_devices(target)[0]
  mesh = jax.sharding.Mesh([device], ("x",))
  placed = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  head = deeplab_v2.ASPPHead(num_classes=classes, form=form)
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32,
                           sharding=placed)
  params = jax.eval_shape(head.init, jax.random.key(0),
                          jnp.zeros(x.shape, x.dtype))
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=placed), params)

  def loss(params, x):
    return jnp.sum(jnp.square(head.apply(params, x)))

  lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
      params, x)
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  flops, bytes_accessed = aot.cost(compiled, target.platform,
                                   aot.HloText(compiled.as_text()))
  return seconds, {"flops": flops, "bytes": bytes_accessed}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--target", default="tpu-v5e-8")
  parser.add_argument("--classes", type=int, default=16)
  parser.add_argument("--forms", default="taps,product,conv")
  report.add_flag(parser)
  args = parser.parse_args()
  target = aot.get_target(args.target)
  forms = args.forms.split(",")
  for form in forms:
    if form not in deeplab_v2.HEAD_FORMS:
      parser.error(f"--forms: {form!r} is not one of "
                   f"{deeplab_v2.HEAD_FORMS}")
  rows = []
  for form in forms:
    seconds, cost = compile_head(target, form, args.classes)
    rows.append(f"| {target.name} | {form} | {args.classes} | {seconds:.1f} s "
                f"| {cost['flops'] / 1e9:.1f} | {cost['bytes'] / 2**30:.2f} |")
    print(f"{target.name}, head as {form}, {args.classes} classes: compiled "
          f"in {seconds:.1f} s, {cost['flops'] / 1e9:.1f} GFLOP, "
          f"{cost['bytes'] / 2**30:.2f} GiB accessed", flush=True)
  if args.markdown:
    print()
    print(report.provenance())
    print()
    print("| target | head | classes | compile | GFLOP | GiB accessed |\n"
          "| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
  main()
