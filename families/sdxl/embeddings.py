"""Textual-inversion embeddings on SDXL-architecture pipelines (SDXL, Pony, Illustrious).

An SDXL embedding file holds `clip_l` ([n, CLIP-L width]) and `clip_g` ([n, OpenCLIP-G
width]): diffusers' `load_textual_inversion` takes each half into its own text encoder and
tokenizer, under the embedding's name (an n-vector file adds `name`, `name_1`, ...). They are
loaded for one batch and unloaded after it, so that the tokenizers never split a later
prompt's longer word (`namex`) at a name that prompt did not ask for.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from daemon.plugin_api import EmbeddingProbe, RenderError, SafetensorsHeader, pipeline_facts

# Where the names of the embeddings loaded into a pipeline for the batch are kept (its
# pipeline_facts extras; empty outside `embeddings_loaded`).
LOADED_EMBEDDINGS = "sdxl.embeddings"
HALVES = (("clip_l", "tokenizer", "text_encoder"), ("clip_g", "tokenizer_2", "text_encoder_2"))


def probe_sdxl_embedding(header: SafetensorsHeader) -> EmbeddingProbe | None:
    tensors = header.tensors
    if set(tensors) != {"clip_l", "clip_g"}:
        return None
    clip_l, clip_g = tensors["clip_l"].shape, tensors["clip_g"].shape
    if len(clip_l) != 2 or len(clip_g) != 2 or clip_l[0] != clip_g[0]:
        return None
    return EmbeddingProbe(reason=f"SDXL: clip_l {list(clip_l)} and clip_g {list(clip_g)}",
                          vectors=clip_l[0])


@contextmanager
def embeddings_loaded(pipe: Any, embeddings: list[dict[str, str]]) -> Iterator[None]:
    """`embeddings` (RenderSpec.extra["embeddings"]: name, path) loaded into both text
    encoders for the duration of the block."""
    if not embeddings:
        yield
        return
    from safetensors.torch import load_file

    loaded: list[tuple[str, str, str]] = []
    try:
        for embedding in embeddings:
            try:
                tensors = load_file(embedding["path"])
            except OSError as exc:
                raise RenderError(f"embedding {embedding['name']!r} cannot be read from "
                                  f"{embedding['path']} ({exc})") from exc
            for key, tokenizer, text_encoder in HALVES:
                encoder = getattr(pipe, text_encoder)
                width = encoder.get_input_embeddings().weight.shape[1]
                if tensors[key].shape[1] != width:
                    raise RenderError(
                        f"embedding {embedding['name']!r}: its {key} vectors are "
                        f"{tensors[key].shape[1]} wide but this checkpoint's {text_encoder} "
                        f"takes {width}; it was made for another model")
                pipe.load_textual_inversion(tensors[key], token=embedding["name"],
                                            text_encoder=encoder,
                                            tokenizer=getattr(pipe, tokenizer))
                loaded.append((embedding["name"], tokenizer, text_encoder))
        pipeline_facts(pipe).extras[LOADED_EMBEDDINGS] = [embedding["name"]
                                                          for embedding in embeddings]
        yield
    finally:
        pipeline_facts(pipe).extras[LOADED_EMBEDDINGS] = []
        for name, tokenizer, text_encoder in reversed(loaded):
            tok = getattr(pipe, tokenizer)
            tokens = [t for t in tok.added_tokens_encoder
                      if t == name or (t.startswith(f"{name}_") and t[len(name) + 1:].isdigit())]
            pipe.unload_textual_inversion(tokens=tokens, tokenizer=tok,
                                          text_encoder=getattr(pipe, text_encoder))


def spelled_as_loaded(text: str, embeddings: list[dict[str, str]]) -> str:
    """`text` with every word that names an embedding (any case, A1111's rule) written as the
    token it was loaded under: added tokens are matched case-sensitively by the tokenizers."""
    for embedding in embeddings:
        name = embedding["name"]
        text = re.sub(rf"(?<![\w]){re.escape(name)}(?![\w])", lambda _match, name=name: name, text,
                      flags=re.IGNORECASE)
    return text
