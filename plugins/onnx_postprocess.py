"""Post-processing with ONNX models through onnxruntime: the `[[postprocess]]` chain of
config.toml, run on every image before its PNG is written.

    [[postprocess]]
    model = "models/onnx/upscale-2x.onnx"
    kind = "upscale"            # image -> image: the output PNG is the upscaled one

    [[postprocess]]
    model = "models/onnx/aesthetic.onnx"
    kind = "scores"             # image -> numbers, one per label, recorded in the history
    labels = ["aesthetic"]
    min_score = 0.5             # the quality gate: below this ...
    gate = "reseed"             # ... "flag" it, or queue the next seed once

    [[postprocess]]
    model = "models/onnx/tagger.onnx"
    kind = "tags"               # labels whose number reaches `threshold` become tags
    labels = ["1girl", "outdoors", "night"]
    threshold = 0.35

Model contract (what the common exported upscalers and scorers take): one image input,
float32 NCHW RGB in [0, 1]. A fixed input size (e.g. a 224x224 scorer) gets the image
resized to it; dynamic sizes get the image as is. An upscaler's output is NCHW RGB in
[0, 1]; a scorer's output is one number per label (any shape that flattens to that).

An upscaled image replaces the render's PNG instead of sitting beside it: one render, one
file, the file the history points at, and it carries the same A1111 `parameters` and
lorafarm spec (the writer embeds them whatever the pixels). Width and height in the
metadata stay those of the render, as A1111's hires-fix-less upscale (Extras) leaves them.

onnxruntime-gpu is the dependency: it also runs on the CPU. CUDA is asked for only when
torch sees a GPU, because onnxruntime-gpu prints a loud error when asked for CUDA on a
machine without one (it then falls back to the CPU anyway).
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from daemon.plugin_api import (
    GATE_RESEED,
    PostProcessResult,
    PostprocessStep,
    RenderSpec,
    hookimpl,
)
from daemon.plugin_api import clear_onnx_models as clear_cache  # noqa: F401 (tests)
from daemon.plugin_api import load_onnx_model as load_model

log = logging.getLogger(__name__)


@hookimpl
def post_process(spec: RenderSpec, image: Image.Image, path: Path,
                 steps: tuple[PostprocessStep, ...]) -> PostProcessResult | None:
    onnx_steps = [s for s in steps if s.model.suffix.lower() == ".onnx"]
    if not onnx_steps:
        return None
    result = PostProcessResult()
    current = image
    for step in onnx_steps:
        model = load_model(step.model)
        if step.kind == "upscale":
            current = model.upscale(current)
            result.image = current
            continue
        # Scorers and taggers see the image the chain has made so far (an upscaler first
        # means they judge the file the user gets).
        labels, values = model.scores(current, step.labels)
        if step.kind == "tags":
            result.tags.update({name: v for name, v in zip(labels, values, strict=True)
                                if v >= step.threshold})
            continue
        result.scores.update(zip(labels, values, strict=True))
        if step.min_score is not None:
            gate_on = step.gate_on or labels[0]
            score = dict(zip(labels, values, strict=True))[gate_on]
            if score < step.min_score and (result.gate != GATE_RESEED):
                result.gate, result.gate_score = step.gate, score
                result.gate_reason = (f"{gate_on} {score:.4f} < min_score {step.min_score} "
                                      f"({step.model.name})")
    return result
