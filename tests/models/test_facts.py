"""models/facts.py: the one model-resolution sequence of the planners."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.models.facts import Declared, declare, frame_stride, probe, resolve
from pipeline.models.spec import parse_spec

IMAGE = {"modality": "image", "resize": 16, "crop": 16}


class FourD(torch.nn.Module):
    def forward(self, x):
        return x.new_zeros(x.shape[0], 2, 3, 5)


def test_declare_probe_resolve():
    d = declare("pipeline.models.zoo:image_cnn?width=4&num_classes=7", (), "--teacher")
    assert (d.modality, d.num_classes, d.parameters > 0) == ("image", 7, True)
    f = resolve(d, "image", IMAGE, "--teacher")
    assert (f.level, f.num_classes, f.frame_shift_ms, f.preprocessing) == ("utterance", 7, None, IMAGE)
    with pytest.raises(ConfigError, match=r"^--student no\.such\.module:f: "):
        declare("no.such.module:f", (), "--student")


def test_probe_refuses_outputs_that_are_neither_utterance_nor_frame_level():
    spec = parse_spec("pipeline.models.zoo:image_cnn?width=4")
    d = Declared("four-d", spec, FourD(), "image", None, None, None, None, None)
    with pytest.raises(ConfigError, match=r"^--teacher four-d: outputs \(2, 2, 3, 5\) on a blank input"):
        probe(d, IMAGE, "--teacher")


def test_frame_stride():
    assert frame_stride(40.0, 20.0, "x") == 2 and frame_stride(20.0, 20.0, "x") == 1
    for teacher, student in ((30.0, 20.0), (10.0, 20.0)):
        with pytest.raises(ConfigError, match="frame rate must match"):
            frame_stride(teacher, student, "--soft-targets r")
