"""Offline stand-ins for real tokenizers, for tiny random-weight checkpoints (demos, tests).

No model hub is reachable where lorafarm's demos and tests run, so a tiny checkpoint cannot
fetch its real tokenizer. These build working tokenizers in memory, deterministically, with
the real special tokens and padding rules, so that every code path that tokenizes a prompt
(diffusers' own encoding, compel's chunking, 77-token padding) runs unchanged on them. The
vocabularies are byte level with no merges: each word is spelled out byte by byte, which is
all a random-weight model needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

CLIP_BOS_TOKEN = "<|startoftext|>"
CLIP_EOS_TOKEN = "<|endoftext|>"
CLIP_MAX_TOKENS = 77  # CLIP's context length; prompts are padded to it as with real models

# Bytes that CLIP's byte-level BPE shows as themselves (printable Latin-1 minus space and
# soft hyphen); every other byte is shown as chr(256 + n). This order is also the order of
# the first 256 ids of the real CLIP vocabulary, which puts "!" at id 0.
_PRINTABLE_BYTE_RANGES = ((ord("!"), ord("~")), (ord("¡"), ord("¬")), (ord("®"), ord("ÿ")))


def byte_level_alphabet() -> list[str]:
    """The 256 characters a byte-level BPE (CLIP, GPT-2, Qwen) shows for the 256 byte
    values, in CLIP's order."""
    shown_as_self = [b for lo, hi in _PRINTABLE_BYTE_RANGES for b in range(lo, hi + 1)]
    remapped = [b for b in range(256) if b not in set(shown_as_self)]
    return [chr(b) for b in shown_as_self] + [chr(256 + n) for n in range(len(remapped))]


def tiny_clip_vocab() -> dict[str, int]:
    """Hand-built CLIP vocabulary: bytes, bytes ending a word, then BOS and EOS as the top ids.

    Built by hand rather than trained: `tokenizers`' BPE trainer is not deterministic across
    processes. EOS must be the highest id for CLIP's EOS pooling, as in the real vocabulary;
    a tiny CLIPTextConfig takes `vocab_size=len(tiny_clip_vocab())` and the BOS/EOS ids from
    it (CLIPTextConfig's defaults are the real ids 49406/49407, which do not exist here).
    """
    alphabet = byte_level_alphabet()
    tokens = alphabet + [f"{char}</w>" for char in alphabet] + [CLIP_BOS_TOKEN, CLIP_EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def tiny_clip_tokenizer(pad_token: str = CLIP_EOS_TOKEN) -> CLIPTokenizer:
    """A CLIPTokenizer over `tiny_clip_vocab`, padding to 77 tokens. CLIP-L (SD 1.x, SDXL's
    first encoder) pads with EOS; SDXL's OpenCLIP-G pads with "!"."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=tiny_clip_vocab(),
        merges=[],
        bos_token=CLIP_BOS_TOKEN,
        eos_token=CLIP_EOS_TOKEN,
        unk_token=CLIP_EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=CLIP_MAX_TOKENS,
    )
