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


def _rows_split(x, devices):
  """Whether x's rows split evenly over the devices."""
  return x.shape[0] >= devices and x.shape[0] % devices == 0


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
  all of `shared`, moved explicitly: an array whose rows split over the
  devices (the batch's pixels) goes from rows to columns by one
  all-to-all (its gradient by another), one of fewer rows is sliced
  locally, and `shared` arrays are all-gathered once. The sort and prefix
  sums then run on one device per column. Left to XLA, they are
  partitioned along the pixels (a distributed sort, gathers and scans
  across devices), and a resharding left to XLA's partitioner can gather
  a whole column per consumer.

  Returns:
    fn's (M,) results.
  """
  mesh = _several_devices()
  if mesh is None:
    return fn(*columns, *shared)
  d = mesh.size
  m = columns[0].shape[1]
  pad = -m % d
  fill = fill or (0,) * len(columns)
  columns = [jnp.pad(c, ((0, 0), (0, pad)), constant_values=v)
             for c, v in zip(columns, fill)]
  col_split = [_rows_split(c, d) for c in columns]
  shared_split = [_rows_split(s, d) for s in shared]

  def local(*args):
    cols, rest = args[:len(columns)], args[len(columns):]
    width = (m + pad) // d
    index = jax.lax.axis_index(DATA_AXIS)
    cols = [jax.lax.all_to_all(c, DATA_AXIS, split_axis=1, concat_axis=0,
                               tiled=True) if by_rows else
            jax.lax.dynamic_slice_in_dim(c, index * width, width, axis=1)
            for c, by_rows in zip(cols, col_split)]
    rest = [jax.lax.all_gather(s, DATA_AXIS, axis=0, tiled=True)
            if by_rows else s for s, by_rows in zip(rest, shared_split)]
    return fn(*cols, *rest)

  out = jax.shard_map(
      local, mesh=mesh,
      in_specs=tuple(P(DATA_AXIS) if by_rows else P()
                     for by_rows in col_split + shared_split),
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
