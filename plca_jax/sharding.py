"""Mesh and shardings: one `data` axis, batch sharded, state replicated.

Each process feeds its own slice of the global batch; `to_global` assembles
process-local NumPy batches into global jax.Arrays
(`jax.make_array_from_process_local_data`). Under jit, BatchNorm statistics
and the Lovasz sort then run over the global per-domain batch (SyncBN for
free), while the association, vmapped per image pair, stays on the device
that holds the pair.
"""

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np

from plca_jax import xla

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


def _several_devices():
  """The mesh of the program being traced if it has several devices."""
  mesh = xla.target_mesh()
  return mesh if mesh is not None and mesh.size > 1 else None


def by_class_column(fn, columns, shared=(), fill=None):
  """`fn(*columns, *shared)` for a function of independent columns, e.g.
  the Lovasz loss's per-class sort of the errors over the whole batch's
  pixels.

  Args:
    fn: maps arrays (P, M) (`columns`) and `shared` ones to a tuple of
      (M,) results, each column's computed from that column alone.
    columns: arrays (R, M) (R may differ between them).
    shared: arrays every column reads whole.
    fill: per column array, the value of padding columns (default 0).

  Under a multi-device `xla.building_for` mesh, each device gets whole
  columns (padded with `fill` columns to a multiple of the devices) and
  all of `shared`: the pixel-sharded arrays move once (all-to-all,
  all-gather) and the sort and prefix sums run on one device per column.
  Left to XLA, they are partitioned along the pixels: a distributed sort,
  gathers and scans across devices (chains of collective-permutes).

  Returns:
    fn's (M,) results.
  """
  mesh = _several_devices()
  if mesh is None:
    return fn(*columns, *shared)
  m = columns[0].shape[1]
  pad = -m % mesh.size
  fill = fill or (0,) * len(columns)
  columns = [jnp.pad(c, ((0, 0), (0, pad)), constant_values=v)
             for c, v in zip(columns, fill)]
  out = jax.shard_map(
      fn, mesh=mesh,
      in_specs=(P(None, DATA_AXIS),) * len(columns) + (P(),) * len(shared),
      out_specs=P(DATA_AXIS))(*columns, *shared)
  return jax.tree.map(lambda x: x[:m], out)


def constrain(x, *spec):
  """`x` laid out as `PartitionSpec(*spec)` on the mesh of the program
  being traced (`xla.building_for`); unchanged outside one, on a single
  device, or where a sharded axis does not split evenly.

  Losses use it to keep whole images on their device where XLA's sharding
  propagation would otherwise repartition an array across them.
  """
  mesh = _several_devices()
  if mesh is None or any(
      name is not None and x.shape[i] % mesh.size
      for i, name in enumerate(spec)):
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))
