"""Mesh and shardings: one `data` axis, batch sharded, state replicated.

Each process feeds its own slice of the global batch; `to_global` assembles
process-local NumPy batches into global jax.Arrays
(`jax.make_array_from_process_local_data`). Under jit, BatchNorm statistics
and the Lovasz sort then run over the global per-domain batch (SyncBN for
free), while the association, vmapped per image pair, stays on the device
that holds the pair.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(devices=None):
  """A 1-D mesh over all (or the given) devices, axis `data`."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh, batch_axis=0):
  """Sharding of an array whose axis `batch_axis` is the global batch."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def check_batch_divides(global_batch, mesh):
  if global_batch % mesh.size:
    raise ValueError(f"global batch size {global_batch} is not divisible by "
                     f"the number of devices {mesh.size}")


def to_global(tree, mesh, batch_axis=0):
  """Process-local NumPy arrays -> global jax.Arrays sharded on the batch."""
  sharding = batch_sharding(mesh, batch_axis)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), tree)
