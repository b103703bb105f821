"""logits_of: the logits from every output convention, a clear error otherwise."""
from collections import OrderedDict

import pytest
import torch

from haprune.outputs import logits_of


class FakeModelOutput(OrderedDict):  # what transformers' ModelOutput is: an OrderedDict with attributes
    def __getattr__(self, k):
        return self[k]


def test_every_convention():
    t = torch.randn(2, 3)
    for out in (t, {"logits": t, "loss": torch.tensor(1.0)}, FakeModelOutput(loss=None, logits=t), (t, 1), [t]):
        assert logits_of(out) is t
    assert logits_of({"scores": t}, lambda o: o["scores"]) is t


def test_unknown_output_names_the_fix():
    with pytest.raises(TypeError, match="output_fn"):
        logits_of({"scores": torch.randn(2)})
    with pytest.raises(TypeError, match="not a tensor"):
        logits_of(torch.randn(2), lambda o: 3)
