"""A1111 prompt weighting and BREAK for pipelines with one CLIP text encoder (SD 1.x style),
through compel: the helper a CLIP-based family calls instead of passing prompt text.

Without it, `(word:1.3)` and `BREAK` reach the text encoder as literal characters. With it,
every render's prompt and negative prompt are encoded the way A1111 encodes them: weights
scale each run's embedding against the empty prompt's, each BREAK chunk is 77 tokens of its
own, prompts longer than 75 tokens are chunked instead of cut off, and clip skip picks the
hidden layer. Every render of a batch goes through compel, weighted or not, so that an
image does not depend on the batch it shared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daemon.contract.prompt_weights import ParsedPrompt, parse_prompt, to_compel_conjunction

if TYPE_CHECKING:
    import torch

    from daemon.contract.spec import RenderSpec

# compel returns the last layer or the penultimate one: A1111's "Clip skip" 1 and 2.
CLIP_SKIP_LEVELS = (1, 2)


class _TextModelView:
    """The text encoder as compel 2.5 expects it: compel normalises the penultimate layer
    with `text_encoder.text_model.final_layer_norm`, where transformers 5's CLIPTextModel
    keeps `final_layer_norm` on the model itself. Everything else goes to the encoder."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self.text_model = encoder

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._encoder(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)


def _with_text_model(encoder: Any) -> Any:
    return encoder if hasattr(encoder, "text_model") else _TextModelView(encoder)


def a1111_prompt_warnings(prompt: str, negative_prompt: str) -> list[str]:
    """What A1111 syntax in either prompt cannot do through compel (an unbalanced bracket,
    prompt editing), for a family's `apply_conventions`."""
    return [f"{which}: {warning}" for which, text in (("prompt", prompt),
                                                      ("negative_prompt", negative_prompt))
            for warning in parse_prompt(text).warnings]


def encode_clip_prompts(pipe: Any, specs: list[RenderSpec], clip_skip: int | None = None,
                        ) -> dict[str, torch.Tensor]:
    """`prompt_embeds` and `negative_prompt_embeds` for every spec (one row each), from
    `pipe.tokenizer` and `pipe.text_encoder` (a transformers CLIPTextModel), for the pipeline
    call in place of `prompt` / `negative_prompt`.

    `clip_skip` is A1111's: None or 1 use the last layer, 2 the penultimate one, both with
    CLIP's final layer norm as A1111 applies it on SD 1.x. Rows are padded with encoded empty
    chunks to the batch's longest, since the denoiser takes one sequence length per batch.
    """
    import torch
    from compel import Compel, ReturnedEmbeddingsType

    if clip_skip not in (None, *CLIP_SKIP_LEVELS):
        raise ValueError(f"clip skip {clip_skip} is not one of {CLIP_SKIP_LEVELS}")
    layer = (ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED if clip_skip == 2
             else ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED)
    device = pipe._execution_device
    # Built per batch, not cached: the text encoder changes when a LoRA with text-encoder
    # weights is applied, and compel caches its encoding of the empty chunk.
    compel = Compel(tokenizer=pipe.tokenizer, text_encoder=_with_text_model(pipe.text_encoder),
                    truncate_long_prompts=False, returned_embeddings_type=layer,
                    device=str(device))
    empty = compel.conditioning_provider.empty_z.to(device)

    def encode(parsed: ParsedPrompt) -> torch.Tensor:
        conjunction = to_compel_conjunction(parsed)
        return compel.build_conditioning_tensor_for_conjunction(conjunction)[0].to(device)

    with torch.no_grad():
        rows = [encode(parse_prompt(spec.prompt)) for spec in specs]
        rows += [encode(parse_prompt(spec.negative_prompt)) for spec in specs]
    longest = max(row.shape[1] for row in rows)
    # Lengths are multiples of the 77-token chunk: pad with whole empty chunks, as A1111.
    padded = [torch.cat([row, *[empty] * ((longest - row.shape[1]) // empty.shape[1])], dim=1)
              for row in rows]
    count = len(specs)
    return {"prompt_embeds": torch.cat(padded[:count]),
            "negative_prompt_embeds": torch.cat(padded[count:])}
