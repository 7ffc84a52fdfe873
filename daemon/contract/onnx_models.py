"""ONNX models through onnxruntime, one inference session per model file, shared by the
`[[postprocess]]` plugin (upscalers, scorers, taggers) and the hires fix's ONNX upscaler.

Model contract (what the common exported upscalers and scorers take): one image input,
float32 NCHW RGB in [0, 1]. A fixed input size (e.g. a 224x224 scorer) gets the image
resized to it; dynamic sizes get the image as is. An upscaler's output is NCHW RGB in
[0, 1]; a scorer's output is one number per label (any shape that flattens to that).

onnxruntime-gpu is the dependency: it also runs on the CPU. CUDA is asked for only when
torch sees a GPU, because onnxruntime-gpu prints a loud error when asked for CUDA on a
machine without one (it then falls back to the CPU anyway).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class OnnxModelError(RuntimeError):
    """A configured model is missing or does not fit the contract; says which and why."""


class OnnxModel:
    """One inference session and what its input wants."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        if not path.is_file():
            raise OnnxModelError(f"post-processing model {path} does not exist; fix "
                                 "config.toml [[postprocess]] model or put the file there")
        options = ort.SessionOptions()
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit():  # share the CPU the way torch is told to
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers())
        except Exception as exc:  # onnxruntime raises its own untyped Fail / InvalidGraph
            raise OnnxModelError(f"{path} is not a model onnxruntime can load: {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise OnnxModelError(f"{path}: expected one NCHW image input, found "
                                 f"{[(i.name, i.shape) for i in inputs]}")
        self.path = path
        self.input_name = inputs[0].name
        height, width = inputs[0].shape[2:]
        # Fixed sizes are ints; dynamic ones are names or None.
        self.fixed_size = (width, height) if isinstance(width, int) and isinstance(
            height, int) else None
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.metadata_labels: tuple[str, ...] = tuple(json.loads(metadata["labels"])) \
            if "labels" in metadata else ()

    def _run(self, image: Image.Image) -> np.ndarray:
        rgb = image.convert("RGB")
        if self.fixed_size is not None and rgb.size != self.fixed_size:
            rgb = rgb.resize(self.fixed_size, Image.Resampling.BICUBIC)
        array = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)[None] / 255.0
        return np.asarray(self.session.run(None, {self.input_name: array})[0])

    def upscale(self, image: Image.Image) -> Image.Image:
        out = self._run(image)
        if out.ndim != 4 or out.shape[1] != 3:
            raise OnnxModelError(f"{self.path}: an upscaler must output NCHW RGB, got shape "
                                 f"{out.shape}")
        pixels = (np.clip(out[0].transpose(1, 2, 0), 0.0, 1.0) * 255.0).round()
        return Image.fromarray(pixels.astype(np.uint8), "RGB")

    def scores(self, image: Image.Image,
               labels: tuple[str, ...]) -> tuple[tuple[str, ...], list[float]]:
        values = [float(v) for v in self._run(image).reshape(-1)]
        labels = labels or self.metadata_labels or tuple(f"score{i}" for i in
                                                         range(len(values)))
        if len(labels) != len(values):
            raise OnnxModelError(f"{self.path} outputs {len(values)} number(s) but "
                                 f"{len(labels)} label(s) are configured; list one label "
                                 "per output in [[postprocess]] labels")
        return labels, values


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


_models: dict[tuple[Path, int], OnnxModel] = {}
_models_lock = threading.Lock()


def load_model(path: Path) -> OnnxModel:
    """A session per model file, kept for the daemon's life and rebuilt when the file
    changes (a model swapped overnight takes effect at the next image)."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = -1
    key = (path, mtime)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            for old in [k for k in _models if k[0] == path]:
                del _models[old]
            model = _models[key] = OnnxModel(path)
        return model


def clear_cache() -> None:
    with _models_lock:
        _models.clear()
