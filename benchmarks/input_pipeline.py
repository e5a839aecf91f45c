r"""Images per second of the training input pipeline on SYNTHIA-sized files.

Writes a SYNTHIA-RAND-CITYSCAPES-format dataset of 1280x760 PNGs (RGB
images, 16-bit 3-channel labels) to a temporary directory, then times the
training stream of docs/method.md, Data (decode, random shorter-edge resize
to [760, 988], flip, 730x730 crop, batches of 4) with 0 (in-process, grain's
read threads), 1 and 2 grain worker processes; and, for comparison, with the
BGR-mean float32 encoding done on the host instead of on the device.

    python benchmarks/input_pipeline.py [--images=16] [--batches=50]

Rates are images / wall time of the whole run of `--batches` batches of 4,
the first batch (and worker start-up) included.
"""

import argparse
import os
import sys
import tempfile
import time

from absl import flags
import grain
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import report
from configs import default as default_config
from plca_jax.data import input_pipeline
from plca_jax.data import transforms
from plca_jax.data.sources import synthia
from tests import fixtures


def write_dataset(root, count, rng):
  h, w = 760, 1280
  yy, xx = np.mgrid[0:h, 0:w]
  for k in range(count):
    # Smooth image content so PNG sizes resemble photographs, not noise.
    image = np.stack([(xx * (k + 1)) % 256, (yy * 3) % 256,
                      ((xx + yy) // 4) % 256], -1).astype(np.uint8)
    image = np.clip(image + rng.integers(0, 20, image.shape), 0, 255)
    os.makedirs(os.path.join(root, "RGB"), exist_ok=True)
    Image.fromarray(image.astype(np.uint8)).save(
        os.path.join(root, "RGB", f"{k:07d}.png"))
    ids = ((yy // 40 + xx // 64 + k) % 23).astype(np.uint16)
    fixtures.write_png16_rgb(
        os.path.join(root, "GT", "LABELS", f"{k:07d}.png"),
        np.stack([ids, ids * 7, np.zeros_like(ids)], -1))


def time_pipeline(root, workers, batches, batch_size=4, encode=True):
  config = default_config.get_config()
  source = synthia.Synthia(root)
  ds = input_pipeline.train_stream(source, config.data, seed=0)
  if encode:  # the alternative design: float32 encoding on the host
    ds = ds.map(lambda e: {**e, "image": transforms.encode(e["image"])})
  ds = ds.batch(batch_size, drop_remainder=True).to_iter_dataset()
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  it = iter(ds)
  t0 = time.perf_counter()
  batch = next(it)  # worker start-up and first batch
  first = time.perf_counter() - t0
  for _ in range(batches - 1):
    batch = next(it)
  # Whole run, start-up included: grain prefetches (threads in-process,
  # worker buffers otherwise) while the first batch is awaited, so rates
  # over a few batches after it would be inflated.
  elapsed = time.perf_counter() - t0
  assert batch["image"].shape == (batch_size, 730, 730, 3), batch["image"].shape
  return batches * batch_size / elapsed, first


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=16)
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--workers", default="0,1,2")
  report.add_flag(parser)
  parser.add_argument("--encode", default="none,host",
                      help="none: uint8 images, as the pipeline ships them "
                      "(encoding on the device); host: float32 encoding in "
                      "the pipeline, for comparison")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  with tempfile.TemporaryDirectory() as root:
    t0 = time.perf_counter()
    write_dataset(root, args.images, np.random.default_rng(0))
    print(f"wrote {args.images} SYNTHIA-format 1280x760 pairs in "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"{'encode':>6} {'workers':>8} {'images/s':>9} "
          f"{'first batch s':>14}")
    rows = []
    for encode in args.encode.split(","):
      for workers in (int(w) for w in args.workers.split(",")):
        rate, first = time_pipeline(root, workers, args.batches,
                                    encode=encode == "host")
        print(f"{encode:>6} {workers:>8} {rate:9.2f} {first:14.2f}")
        rows.append((encode, workers, f"{rate:.2f}", f"{first:.2f}"))
  print(f"({os.cpu_count()} CPU cores; {args.batches} batches of 4)")
  report.emit(args, ("encode", "workers", "images/s", "first batch s"), rows)


if __name__ == "__main__":
  main()
