"""The Wan 2.2 releases the family knows and their settings, shared by the family and its
tiny builders (kept apart so that the builders need not import the family module, which
imports them for its demo)."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.plugin_api import FamilyDefaults

T2V_A14B, I2V_A14B, TI2V_5B = "t2v-a14b", "i2v-a14b", "ti2v-5b"

# The official default negative prompt (Wan2.2 repository, wan/configs/shared_config.py,
# `sample_neg_prompt`), verbatim; Wan was trained with it. In English: garish colours,
# overexposed, static, blurred details, subtitles, style, artwork, painting, still frame,
# overall greyish, worst quality, low quality, JPEG artefacts, ugly, mutilated, extra
# fingers, badly drawn hands or face, deformed, disfigured, malformed limbs, fused fingers,
# motionless picture, cluttered background, three legs, crowded background, walking
# backwards.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
    "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class VariantSettings:
    """What a Wan 2.2 release is, in diffusers terms, and what its jobs default to."""

    title: str
    defaults: FamilyDefaults
    two_experts: bool
    boundary_ratio: float | None
    expand_timesteps: bool
    image: str  # "required", "optional" or "none": whether jobs give a first frame


_A14B_SIZES = {"width": 832, "height": 480, "size_multiple": 16, "frames": 81, "fps": 16}
VARIANT_SETTINGS = {
    # Official sample settings (Wan2.2 wan/configs/wan_*.py): shift 12, guidance 4.0 for the
    # high-noise expert and 3.0 for the low-noise one, 40 steps.
    T2V_A14B: VariantSettings(
        title="Wan 2.2 T2V-A14B",
        defaults=FamilyDefaults(steps=40, cfg=4.0, guidance_2=3.0, flow_shift=12.0,
                                sampler="UniPC", schedule=None,
                                negative_prompt=WAN_NEGATIVE_PROMPT,
                                **_A14B_SIZES),  # type: ignore[arg-type]
        two_experts=True, boundary_ratio=0.875, expand_timesteps=False, image="none"),
    I2V_A14B: VariantSettings(
        title="Wan 2.2 I2V-A14B",
        defaults=FamilyDefaults(steps=40, cfg=3.5, guidance_2=3.5, flow_shift=5.0,
                                sampler="UniPC", schedule=None,
                                negative_prompt=WAN_NEGATIVE_PROMPT,
                                **_A14B_SIZES),  # type: ignore[arg-type]
        two_experts=True, boundary_ratio=0.9, expand_timesteps=False, image="required"),
    # 1280x704: sides must be multiples of 32 (16x VAE times 2x2 patches).
    TI2V_5B: VariantSettings(
        title="Wan 2.2 TI2V-5B",
        defaults=FamilyDefaults(width=1280, height=704, size_multiple=32, steps=50, cfg=5.0,
                                flow_shift=5.0, frames=121, fps=24, sampler="UniPC",
                                schedule=None, negative_prompt=WAN_NEGATIVE_PROMPT),
        two_experts=False, boundary_ratio=None, expand_timesteps=True, image="optional"),
}
