"""The model runner's fixed shapes for --compile: padding rows and length buckets change no
valid output, and every batch of a bucket reuses one compiled graph."""

from __future__ import annotations

import torch

from pipeline.modalities import preprocessing_from_dict
from pipeline.models.runner import LENGTH_BUCKETS_S, ModelRunner, bucket_length
from pipeline.models.zoo import audio_cnn, image_cnn


def test_bucket_length():
    sr = 16000
    assert [bucket_length(n, sr) for n in (1, 8000, 8001, 16000, 16001, 159_999, 160_000)] == \
        [8000, 8000, 16000, 16000, 20000, 160_000, 160_000]
    assert bucket_length(30 * sr + 1, sr) == 40 * sr  # beyond the table: multiples of 10 s
    for lo, hi in zip(LENGTH_BUCKETS_S[1:], LENGTH_BUCKETS_S[2:]):
        assert hi / lo <= 1.25 + 1e-9  # at most a quarter of padding


def test_static_shapes_keep_valid_outputs_and_compile_once():
    torch.manual_seed(0)
    model = audio_cnn(width=4, level="frame").eval()
    prep = preprocessing_from_dict({"modality": "audio"})
    eager = ModelRunner([model], prep, "cpu")
    fixed = ModelRunner([model], prep, "cpu")
    graphs = []

    def backend(gm, example_inputs):  # a compiler that runs the traced graph as it is (quick), counting them
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    fixed.compile(4, backend=backend)
    x = torch.randn(3, 12000) * 0.1
    lengths = torch.tensor([12000, 9000, 5000])
    want = eager.predict(x, lengths)
    got = fixed.predict(x, lengths)
    assert got.logits[0].shape[0] == 3 and torch.equal(got.frames, want.frames)  # padding rows dropped
    t = want.logits[0].shape[1]
    assert torch.allclose(got.logits[0][:, :t], want.logits[0], atol=1e-5)  # 1 s bucket: valid frames equal
    fixed.predict(x[:2, :9000], lengths[:2].clamp(max=9000))  # same bucket, fewer rows: the same graph
    assert len(graphs) == 1 and (4, 101, 40) in graphs[0], graphs  # 4 rows, 1 s of log-mel frames
    fixed.predict(torch.randn(1, 20000) * 0.1, torch.tensor([20000]))  # the next bucket: one more
    assert len(graphs) == 2 and (4, 126, 40) in graphs[1], graphs
    img = ModelRunner([image_cnn(num_classes=5).eval()], preprocessing_from_dict({"modality": "image"}), "cpu")
    ref = img.predict(torch.randint(0, 255, (3, 32, 32, 3), dtype=torch.uint8), None)
    assert ref.logits[0].shape == (3, 5)
    img.static_rows = 8  # images: rows only
    xi = torch.randint(0, 255, (3, 32, 32, 3), dtype=torch.uint8)
    assert torch.allclose(img.predict(xi, None).logits[0], ModelRunner(img.models, img.prep, "cpu").predict(xi, None).logits[0],
                          atol=1e-5)
