"""Diagnostics of a cycle association: consistency, reach, correctness.

Statistics of `association.cycle_association`'s result for the training
log ("train/fass_consistent", ...) and the analysis tools; none enters a
loss.
"""

import jax
import jax.numpy as jnp


def association_statistics(assoc, target_size, target_labels=None,
                           ignore_label=255):
  """Diagnostics of a `cycle_association` result.

  Args:
    assoc: the dict `cycle_association` returns.
    target_size: number of target grid pixels (Ht * Wt).
    target_labels: optional (N, Ht * Wt) int target labels on the target
      grid, for analysis only (they never enter a loss).
    ignore_label: label value that counts as unlabelled.

  Returns:
    dict of float32 scalars: "consistent": share of valid source pixels
    whose cycle returns to their class; "reached": mean over images of the
    share of distinct target pixels that are j* of some valid source pixel;
    with target labels also "correct": share of consistent cycles, among
    those whose j* is labelled, where the target pixel j* has the source
    pixel's class (0 if there are none).
  """
  valid = assoc["valid"]
  consistent = (jnp.sum(assoc["selected"]) /
                jnp.maximum(jnp.sum(valid), 1))

  def reached(j_star, v):
    hit = jnp.zeros((target_size,), jnp.bool_).at[j_star].max(v)
    return jnp.mean(hit.astype(jnp.float32))

  stats = {"consistent": consistent.astype(jnp.float32),
           "reached": jnp.mean(jax.vmap(reached)(assoc["j_star"], valid))}
  if target_labels is not None:
    hit, counted, _ = _correct(assoc, target_labels, ignore_label)
    stats["correct"] = (jnp.sum(hit) / jnp.maximum(jnp.sum(counted), 1)
                        ).astype(jnp.float32)
  return stats


def _correct(assoc, target_labels, ignore_label):
  """Per source pixel: (j* has the source class, cycle counted, label at j*).

  Counted: consistent cycles whose j* is labelled.
  """
  if (target_labels.ndim != 2 or
      target_labels.shape[0] != assoc["j_star"].shape[0]):
    raise ValueError(f"target_labels {target_labels.shape} must be (N, Ht * "
                     f"Wt) with N = {assoc['j_star'].shape[0]}, the batch of "
                     "the association")
  t_at_j = jnp.take_along_axis(target_labels, assoc["j_star"], axis=1)
  counted = assoc["selected"] & (t_at_j != ignore_label)
  return counted & (t_at_j == assoc["source_labels"]), counted, t_at_j


def association_confusion(assoc, target_labels, num_classes,
                          ignore_label=255):
  """(M, M) int32 counts of consistent cycles: source class i (row) whose
  target pixel j* has class k (column); unlabelled j* are not counted.

  The diagonal over the row sums is the per-class "correct" share.
  """
  _, counted, t_at_j = _correct(assoc, target_labels, ignore_label)
  rows = jnp.where(counted, assoc["source_labels"], 0).reshape(-1)
  cols = jnp.where(counted, t_at_j, 0).reshape(-1)
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[
      rows * num_classes + cols].add(counted.reshape(-1).astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)
