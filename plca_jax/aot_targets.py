"""The accelerators plca_jax.aot compiles for: chips and slices.

Each chip's figures are the vendor's published peaks (one chip; dense, no
sparsity), cited by `source`. `matmul_flops` is the peak of the matrix
units at the precision XLA uses for float32 products by default on that
platform: bfloat16 passes on TPU, TF32 on NVIDIA GPUs since Ampere.
`memory` is the device memory a program may use: on TPU the HBM that
libtpu's compiler allows one (the figure its out-of-memory error names,
a little below the vendor's), on GPU the card's memory.

A target is a slice: chips, hosts, and how to get its devices without the
hardware (`jax.experimental.topologies`); on GPU, an XLA
GpuTargetConfigProto text describing the card.
"""

import dataclasses

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  memory: int  # bytes
  bf16_flops: float  # FLOP/s
  matmul_flops: float  # FLOP/s of float32 products at default precision
  bandwidth: float  # bytes/s of device memory
  source: str


CHIPS = {
    "tpu-v4": Chip("TPU v4", int(30.75 * GiB), 275e12, 275e12, 1200e9,
                   "https://cloud.google.com/tpu/docs/v4"),
    "tpu-v5e": Chip("TPU v5e", int(15.75 * GiB), 197e12, 197e12, 819e9,
                    "https://cloud.google.com/tpu/docs/v5e"),
    "tpu-v5p": Chip("TPU v5p", int(95.74 * GiB), 459e12, 459e12, 2765e9,
                    "https://cloud.google.com/tpu/docs/v5p"),
    "tpu-v6e": Chip("TPU v6e (Trillium)", int(31.25 * GiB), 918e12,
                    918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
    "a100-80gb": Chip("NVIDIA A100 80GB SXM", 80 * GiB, 312e12, 156e12,
                      2039e9, "https://www.nvidia.com/en-us/data-center/a100/"),
    "h100-80gb": Chip("NVIDIA H100 80GB SXM", 80 * GiB, 989e12, 494.5e12,
                      3350e9, "https://www.nvidia.com/en-us/data-center/h100/"),
}

# XLA's description of each GPU (GpuTargetConfigProto, text form): what its
# compiler reads from a real device. The SM counts, clocks, caches and
# limits are NVIDIA's (CUDA occupancy tables and the data sheets above).
_GPU_DEVICE_INFO = {
    "a100-80gb": dict(
        compute_capability=(8, 0), core_count=108, fpus_per_core=64,
        shared_memory_per_block_optin=166912, shared_memory_per_core=167936,
        memory_bandwidth=2039000000000, l2_cache_size=41943040,
        clock_rate_ghz=1.41, device_memory_size=80 * GiB,
        description="NVIDIA A100-SXM4-80GB"),
    "h100-80gb": dict(
        compute_capability=(9, 0), core_count=132, fpus_per_core=128,
        shared_memory_per_block_optin=232448, shared_memory_per_core=233472,
        memory_bandwidth=3352320000000, l2_cache_size=52428800,
        clock_rate_ghz=1.98, device_memory_size=80 * GiB,
        description="NVIDIA H100 80GB HBM3"),
}


def images_per_second(images, chips, update_s):
  """Images per domain per second per device of an update of `images` per
  domain over `chips` devices that takes `update_s` seconds."""
  return images / chips / max(update_s, 1e-12)


def gpu_target_config(chip):
  """The GpuTargetConfigProto text of `chip` (a key of _GPU_DEVICE_INFO)."""
  info = _GPU_DEVICE_INFO[chip]
  major, minor = info["compute_capability"]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {info["shared_memory_per_core"]}
  threads_per_core_limit: 2048
  core_count: {info["core_count"]}
  fpus_per_core: {info["fpus_per_core"]}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {info["memory_bandwidth"]}
  l2_cache_size: {info["l2_cache_size"]}
  clock_rate_ghz: {info["clock_rate_ghz"]}
  device_memory_size: {info["device_memory_size"]}
  shared_memory_per_block_optin: {info["shared_memory_per_block_optin"]}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{info["description"]}"
"""


@dataclasses.dataclass(frozen=True)
class Target:
  """A slice to compile for.

  TPU: `topology` is libtpu's name ("v5e:2x4"), with the chips each host
  holds; GPU: `topology` is "partitions x hosts x devices per host".
  """
  name: str
  platform: str  # "tpu" or "gpu"
  chip: str  # key of CHIPS
  chips: int
  hosts: int
  topology: str
  chips_per_host_bounds: tuple = (2, 2, 1)
  chip_config_name: str = "default"

  @property
  def spec(self):
    return CHIPS[self.chip]


TARGETS = {t.name: t for t in [
    Target("tpu-v4-8", "tpu", "tpu-v4", 4, 1, "v4:2x2x1",
           chip_config_name="megacore"),
    Target("tpu-v4-32", "tpu", "tpu-v4", 16, 4, "v4:2x2x4",
           chip_config_name="megacore"),
    Target("tpu-v5e-4", "tpu", "tpu-v5e", 4, 1, "v5e:2x2"),
    Target("tpu-v5e-8", "tpu", "tpu-v5e", 8, 1, "v5e:2x4",
           chips_per_host_bounds=(2, 4, 1)),
    Target("tpu-v5p-8", "tpu", "tpu-v5p", 4, 1, "v5p:2x2x1",
           chip_config_name="megacore"),
    Target("tpu-v6e-8", "tpu", "tpu-v6e", 8, 1, "v6e:2x4",
           chips_per_host_bounds=(2, 4, 1)),
    Target("gpu-a100-80gb", "gpu", "a100-80gb", 1, 1, "1x1x1"),
    Target("gpu-a100-80gb-x8", "gpu", "a100-80gb", 8, 1, "1x1x8"),
    Target("gpu-h100-80gb", "gpu", "h100-80gb", 1, 1, "1x1x1"),
    Target("gpu-h100-80gb-x8", "gpu", "h100-80gb", 8, 1, "1x1x8"),
]}
