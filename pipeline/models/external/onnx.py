"""``onnx:FILE``: an ONNX graph run by ONNX Runtime (CPU; CUDA where onnxruntime-gpu provides it).

Input and output names, element types and shapes are read from the graph:

- the first floating-point input takes the frontend's output: (B, 3, H, W) images, (B, N) raw
  waveforms (``--features none``) or (B, T, F) features; an optional integer input of rank 1
  takes the valid lengths (B,) (samples or feature frames);
- the first floating-point output is the logits: (B, C) utterance level or (B, T', C) frame
  level; an optional integer output of rank 1 gives the valid output frames (B,).

Preprocessing comes from the flags (an ONNX file does not record it). Graph metadata
(``metadata_props``) may carry ``frame_shift_ms`` and ``class_names`` (a JSON list), read if
present. A graph with a fixed batch size runs row by row. Weights stored as external data
(``torch.onnx.export``'s ``FILE.data``, any file next to FILE whose name starts with FILE's)
are loaded with it and covered by its digest.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.models.external import digest_files, local_copy, require
from pipeline.models.spec_types import SpecError

_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_INTS = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OnnxTeacher(nn.Module):
    """forward(x, lengths) -> logits, through an onnxruntime InferenceSession on x's device."""

    def __init__(self, local_path: str, uri: str):
        super().__init__()
        self._ort = require("onnxruntime", "onnx")
        self._path, self.uri = local_path, uri
        self._sessions: dict[str, Any] = {}
        self._last_frames: torch.Tensor | None = None
        sess = self._session(torch.device("cpu"))
        ins, outs = sess.get_inputs(), sess.get_outputs()
        x_in = [i for i in ins if i.type in _FLOATS]
        len_in = [i for i in ins if i.type in _INTS and len(i.shape) == 1]
        if not x_in or len(x_in) + len(len_in[:1]) != len(ins):
            raise SpecError(f"onnx:{uri}: inputs {[(i.name, i.type, i.shape) for i in ins]}; kdpipe feeds one float "
                            "tensor (images, waveforms or features) and optionally one int (B,) lengths")
        self.x_name, self.x_type, self.x_shape = x_in[0].name, _FLOATS[x_in[0].type], list(x_in[0].shape)
        self.len_name = len_in[0].name if len_in else None
        self.len_type = _INTS[len_in[0].type] if len_in else None
        y_out = [o for o in outs if o.type in _FLOATS]
        if not y_out:
            raise SpecError(f"onnx:{uri}: no floating-point output (outputs {[(o.name, o.type) for o in outs]})")
        self.y_name, y_rank = y_out[0].name, len(y_out[0].shape)
        frames_out = [o for o in outs if o.type in _INTS and len(o.shape) == 1]
        self.frames_name = frames_out[0].name if frames_out else None
        rank = len(self.x_shape)
        if rank not in (2, 3, 4) or y_rank not in (2, 3):
            raise SpecError(f"onnx:{uri}: input {self.x_name} has rank {rank}, output {self.y_name} rank {y_rank}; "
                            "expected (B, 3, H, W) / (B, N) / (B, T, F) in and (B, C) / (B, T', C) out")
        self.modality = "image" if rank == 4 else "audio"
        self.level = "frame" if y_rank == 3 else "utterance"
        c = y_out[0].shape[-1]
        self.num_classes = int(c) if isinstance(c, int) else None
        self.fixed_batch = self.x_shape[0] if isinstance(self.x_shape[0], int) else None
        meta = sess.get_modelmeta().custom_metadata_map
        self.frame_shift_ms = float(meta["frame_shift_ms"]) if self.level == "frame" and "frame_shift_ms" in meta else None
        self.kdpipe_class_names = json.loads(meta["class_names"]) if "class_names" in meta else None
        self.kdpipe_preprocessing = None  # from flags
        if self.frames_name is None:
            self.output_lengths = None  # proportional fallback in pipeline.models.base.output_lengths

    def _session(self, device: torch.device):
        key = "cuda" if device.type == "cuda" else "cpu"
        if key not in self._sessions:
            ort = self._ort
            providers = ["CPUExecutionProvider"]
            if key == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = max(1, torch.get_num_threads())
            try:
                self._sessions[key] = ort.InferenceSession(self._path, sess_options=opts, providers=providers)
            except Exception as e:
                raise SpecError(f"onnx:{self.uri}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None
        return self._sessions[key]

    def _check(self, x: torch.Tensor) -> None:
        want = self.x_shape
        if x.dim() != len(want):
            hint = {2: "raw waveforms (B, N): pass --features none", 3: "features (B, T, F)",
                    4: "images (B, 3, H, W)"}[len(want)]
            raise ValueError(f"onnx:{self.uri}: input {self.x_name} takes {hint}, got shape {tuple(x.shape)}")
        for i, (d, n) in enumerate(zip(want[1:], x.shape[1:]), start=1):
            if isinstance(d, int) and d != n:
                raise ValueError(f"onnx:{self.uri}: input {self.x_name} has a fixed size {d} in dimension {i}, "
                                 f"the frontend gives {n} (shape {tuple(x.shape)}); check the preprocessing flags "
                                 "(--image-crop, --n-mels, --crop-seconds)")

    def _run(self, sess, x: np.ndarray, lengths: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        feed = {self.x_name: x}
        if self.len_name is not None:
            feed[self.len_name] = lengths
        names = [self.y_name] + ([self.frames_name] if self.frames_name else [])
        res = sess.run(names, feed)
        return res[0], (res[1] if self.frames_name else None)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x)
        sess = self._session(x.device)
        xs = x.detach().float().cpu().numpy().astype(self.x_type, copy=False)
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1] if x.dim() < 4 else 0)
        ls = lengths.detach().cpu().numpy().astype(self.len_type or np.int64)
        if self.fixed_batch and self.fixed_batch != xs.shape[0]:
            if self.fixed_batch != 1:
                raise ValueError(f"onnx:{self.uri}: the graph's batch size is fixed at {self.fixed_batch}")
            parts = [self._run(sess, xs[i: i + 1], ls[i: i + 1]) for i in range(xs.shape[0])]
            y = np.concatenate([p[0] for p in parts])
            frames = np.concatenate([p[1] for p in parts]) if self.frames_name else None
        else:
            y, frames = self._run(sess, xs, ls)
        self._last_frames = torch.from_numpy(np.asarray(frames, np.int64)) if frames is not None else None
        return torch.from_numpy(np.asarray(y, np.float32)).to(x.device)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:  # replaced by None without a frames output
        """Valid output frames of the last forward (the graph's integer output)."""
        if self._last_frames is None or self._last_frames.shape[0] != lengths.shape[0]:
            raise RuntimeError("output_lengths() follows a forward() of the same batch")
        return self._last_frames.to(lengths.device)


def model_files(uri: str) -> list[str]:
    """The graph file and its external-data files (siblings whose names start with its name)."""
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    parent = uri[: len(uri) - len(base)].rstrip("/") or "."
    extra = [u for u in storage.listdir(parent) if u.rsplit("/", 1)[-1].startswith(base) and
             u.rsplit("/", 1)[-1] != base]
    return [uri] + sorted(extra)


def build(spec) -> nn.Module:
    import os

    uri = spec.weights
    files = model_files(uri)
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    parent = uri[: len(uri) - len(base)].rstrip("/") or "."
    try:
        local = local_copy(parent, [f.rsplit("/", 1)[-1] for f in files])
    except (OSError, FileNotFoundError) as e:
        raise SpecError(f"onnx:{uri}: cannot read it ({e})") from None
    return OnnxTeacher(os.path.join(local, base), uri)


def identity(spec) -> dict[str, Any]:
    return {"kind": "onnx", "sha256": digest_files(model_files(spec.weights))}
