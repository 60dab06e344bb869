"""Model plumbing: where the value model finds the transformer body."""

import pytest
import torch


def test_backbone_of_finds_the_body_whatever_its_attribute_is_called(tiny_lm):
    """value_init reads the body under the head: by base_model_prefix, else (remote code such as
    MPT, whose prefix is not its attribute's name) its one pretrained child."""
    from rlhf.models import ModelError
    from rlhf.value import backbone_of

    assert backbone_of(tiny_lm, "m") is tiny_lm.model

    class Renamed(torch.nn.Module):
        base_model_prefix = "model"

        def __init__(self, body):
            super().__init__()
            self.transformer, self.lm_head = body, torch.nn.Linear(4, 4)

    assert backbone_of(Renamed(tiny_lm.model), "m") is tiny_lm.model
    with pytest.raises(ModelError, match="m: cannot find the transformer body of Renamed"):
        backbone_of(Renamed(torch.nn.Linear(2, 2)), "m")
