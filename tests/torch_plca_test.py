"""The release-style PyTorch PLCA terms of benchmarks/ against the reference.

benchmarks/torch_plca.py is the same-machine reference the README's speed
and memory comparisons are made against; this checks that it computes the
losses of docs/method.md, Losses (NumPy float64 reference, tests/reference.py).
"""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import torch

from benchmarks import torch_plca
from tests import reference


class TorchPLCATest(parameterized.TestCase):

  @parameterized.parameters("cos", "kl")
  def test_association_matches_reference(self, metric):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 3, 4, 5))
    t = rng.normal(size=(2, 3, 3, 5))
    if metric == "kl":
      s, t = reference.softmax(2 * s), reference.softmax(2 * t)
    y = rng.integers(0, 3, size=(2, 3, 4))
    y[rng.random(y.shape) < 0.2] = 255
    got = torch_plca.association(
        torch.from_numpy(s.reshape(2, 12, 5)),
        torch.from_numpy(t.reshape(2, 9, 5)),
        torch.from_numpy(y.reshape(2, 12)), metric)
    expected = reference.cycle(s, t, y, metric)[0]
    self.assertGreater(expected, 0.0)
    np.testing.assert_allclose(float(got), expected, rtol=1e-10)

  def test_lovasz_and_lsr_match_reference(self):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 6, 4))
    y = rng.integers(0, 4, size=(2, 5, 6))
    y[0, 0] = 255
    probs = reference.softmax(logits)
    got = torch_plca.lovasz_softmax(torch.from_numpy(probs.reshape(-1, 4)),
                                    torch.from_numpy(y.reshape(-1)))
    np.testing.assert_allclose(float(got),
                               reference.lovasz_softmax(probs, y),
                               rtol=1e-10)
    got = torch_plca.lsr(torch.from_numpy(logits).permute(0, 3, 1, 2))
    np.testing.assert_allclose(float(got), reference.lsr(logits),
                               rtol=1e-10)


if __name__ == "__main__":
  absltest.main()
