"""Class-overlap pairing (plca_jax/data/pairing.py) and its training use."""

import json

from absl.testing import absltest
from etils import epath
import numpy as np
import pytest

from configs import test as test_config
from plca_jax import checkpointing
from plca_jax.data import input_pipeline
from plca_jax.data import pairing


def _config(target_classes="labels", candidates=3):
  config = test_config.get_config()
  config.data.pairing = "class_overlap"
  config.data.pairing_candidates = candidates
  config.data.pairing_target_classes = target_classes
  config.data.target.require_labels = target_classes == "labels"
  return config


def _take(iterator, n, observe_seed=None):
  """n batches; with observe_seed, feeds random predictions after each."""
  rng = np.random.default_rng(observe_seed)
  out = []
  for _ in range(n):
    batch = next(iterator)
    out.append(batch)
    if observe_seed is not None:
      iterator.observe(rng.random((len(batch["target"]["index"]),
                                   iterator.num_classes)) < 0.5)
  return out


def _assert_same(test, a, b):
  test.assertEqual(len(a), len(b))
  for x, y in zip(a, b):
    for part in ("source", "target"):
      for key in ("image", "label", "index"):
        np.testing.assert_array_equal(x[part][key], y[part][key])
    for key in ("shared", "candidates", "known"):
      np.testing.assert_array_equal(x["pairing"][key], y["pairing"][key])


class ChooseTest(absltest.TestCase):

  def test_best_candidate_first_on_ties_random_when_unknown(self):
    sets = np.array([[1, 0, 0, 1], [1, 1, 0, 1], [0, 1, 1, 1],
                     [1, 1, 0, 1]], bool)
    target = np.array([1, 1, 0, 0], bool)
    pick, shared = pairing.choose(sets, target)
    np.testing.assert_array_equal(shared, [1, 2, 1, 2])
    self.assertEqual(pick, 1)
    pick, _ = pairing.choose(sets, target, known=False)
    self.assertEqual(pick, 0)

  def test_class_set(self):
    label = np.array([[0, 0, 3], [255, 3, 7]], np.uint8)
    np.testing.assert_array_equal(
        np.flatnonzero(pairing.class_set(label, 8)), [0, 3, 7])
    np.testing.assert_array_equal(
        np.flatnonzero(pairing.class_set(label, 8, min_pixels=2)), [0, 3])


class OverlapPipelineTest(absltest.TestCase):

  def test_never_worse_than_the_best_candidate_and_deterministic(self):
    config = _config("labels")
    source = input_pipeline.create_source(config.data.source, config.data,
                                          config.model.num_classes)
    target = input_pipeline.create_source(config.data.target, config.data,
                                          config.model.num_classes)
    m = config.model.num_classes
    batches = _take(input_pipeline.create_train_iterator(config), 6)
    again = _take(input_pipeline.create_train_iterator(config), 6)
    _assert_same(self, batches, again)
    chose_other_than_first = 0
    for batch in batches:
      for b, t in enumerate(batch["target"]["index"]):
        t_set = pairing.class_set(target.label(t), m)
        # Recomputed here from the labels, independently of the iterator.
        shared = [int(np.sum(pairing.class_set(source.label(c), m) & t_set))
                  for c in batch["pairing"]["candidates"][b]]
        self.assertEqual(int(batch["pairing"]["shared"][b]), max(shared))
        chosen = batch["source"]["index"][b]
        self.assertIn(chosen, batch["pairing"]["candidates"][b])
        self.assertEqual(
            int(np.sum(pairing.class_set(source.label(chosen), m) & t_set)),
            max(shared))
        chose_other_than_first += int(
            chosen != batch["pairing"]["candidates"][b][0])
    # The choice is really made (not always the first, random, candidate).
    self.assertGreater(chose_other_than_first, 0)

  def test_pseudo_labels_update_and_resume_exactly(self):
    config = _config("pseudo")
    it = input_pipeline.create_train_iterator(config)
    first = _take(it, 3, observe_seed=1)
    self.assertFalse(first[0]["pairing"]["known"].any())  # nothing seen yet
    state = it.get_state()
    rest = _take(it, 6, observe_seed=2)
    self.assertTrue(any(b["pairing"]["known"].any() for b in rest))

    # Through JSON, as checkpointing.save writes it.
    restored = input_pipeline.create_train_iterator(config)
    _take(restored, 1, observe_seed=1)
    restored.set_state(json.loads(json.dumps(state)))
    _assert_same(self, _take(restored, 6, observe_seed=2), rest)

    # The table matters: other predictions, other pairs.
    other = input_pipeline.create_train_iterator(config)
    other.set_state(state)
    changed = _take(other, 6, observe_seed=3)
    self.assertNotEqual(
        [b["source"]["index"].tolist() for b in changed[1:]],
        [b["source"]["index"].tolist() for b in rest[1:]])

  @pytest.mark.slow
  def test_two_processes_pick_what_one_process_picks(self):
    # Each process chooses for its rows from the global table; the trainer
    # observes the whole global batch on every process (train._gather_micro
    # puts the rows in the global order, emulated here), so the picks of 2
    # processes are the rows of the one-process picks, with both target
    # class modes.
    for mode in ("labels", "pseudo"):
      config = _config(mode)
      config.train.batch_size = 4
      one = input_pipeline.create_train_iterator(config)
      two = [input_pipeline.create_train_iterator(config, p, 2)
             for p in range(2)]
      rng = np.random.default_rng(0)
      picks_differ_from_first = 0
      for step in range(8):
        expected = next(one)
        local = [next(it) for it in two]
        for key in ("index", "image"):
          np.testing.assert_array_equal(
              np.concatenate([x["source"][key] for x in local]),
              expected["source"][key], err_msg=f"{mode} step {step}")
        for key in ("shared", "known", "candidates"):
          np.testing.assert_array_equal(
              np.concatenate([x["pairing"][key] for x in local]),
              expected["pairing"][key])
        picks_differ_from_first += int(np.sum(
            expected["source"]["index"] !=
            expected["pairing"]["candidates"][:, 0]))
        predicted = rng.random((4, one.num_classes)) < 0.5
        one.observe(predicted)
        indices = np.concatenate([it.pending() for it in two])
        np.testing.assert_array_equal(indices, expected["target"]["index"])
        for it in two:
          it.observe(predicted, indices)
      self.assertGreater(picks_differ_from_first, 0, mode)
      np.testing.assert_array_equal(two[0].table, one.table)
      np.testing.assert_array_equal(two[1].known, one.known)

  def test_old_per_process_checkpoint_state_restores(self):
    # The format before the global stream: grain's file per process with
    # the pairing table next to the inner iterator's position.
    config = _config("pseudo")
    it = input_pipeline.create_train_iterator(config)
    _take(it, 3, observe_seed=1)
    state = it.get_state()
    old = {"inner": {"next_index": 3}, "mode": "pseudo",
           "shape": state["shape"], "table": state["table"],
           "known": state["known"]}
    directory = epath.Path(self.create_tempdir().full_path)
    (directory / "process_0-of-1.json").write_text(json.dumps(old))
    restored = input_pipeline.create_train_iterator(config)
    restored.set_state(checkpointing._legacy_data_state(directory))
    np.testing.assert_array_equal(restored.table, it.table)
    np.testing.assert_array_equal(restored.known, it.known)
    self.assertTrue(restored.known.any())
    _assert_same(self, _take(restored, 2), _take(it, 2))

  def test_bad_options_are_named(self):
    config = _config("labels")
    config.data.target.require_labels = False
    with self.assertRaisesRegex(ValueError, "require_labels"):
      input_pipeline.create_train_iterator(config)
    config = _config("pseudo", candidates=0)
    with self.assertRaisesRegex(ValueError, "pairing_candidates=0"):
      input_pipeline.create_train_iterator(config)
    config = _config("pseudo")
    config.data.pairing = "overlap"
    with self.assertRaisesRegex(ValueError, "pairing='overlap'"):
      input_pipeline.create_train_iterator(config)
    it = input_pipeline.create_train_iterator(_config("pseudo"))
    next(it)
    with self.assertRaisesRegex(RuntimeError, "observe"):
      it.get_state()
    with self.assertRaisesRegex(ValueError, "expected"):
      it.observe(np.zeros((1, 16), bool))


if __name__ == "__main__":
  absltest.main()
