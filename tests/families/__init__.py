"""One model family or its tiny checkpoints: loading, rendering, LoRAs and prompt weights per
family, quantized bases, ComfyUI/A1111 model trees."""
