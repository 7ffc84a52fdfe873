"""Flux.1 settings the family and its tiny builders share (kept apart so that the builders
need not import the family module, which imports them for its demo)."""

from __future__ import annotations

from typing import Any

# The scheduler settings FLUX.1-dev and -schnell ship with (scheduler_config.json). dev shifts
# its sigmas by image size (mu from the image token count); schnell was distilled for 1-4
# unshifted steps. Applied over a single file's base folder, which may be the other variant.
SCHEDULER_SETTINGS: dict[str, dict[str, Any]] = {
    "dev": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
            "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
            "max_image_seq_len": 4096},
    "schnell": {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
                "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                "max_image_seq_len": 4096},
}
