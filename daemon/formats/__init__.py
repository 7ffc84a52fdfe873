"""What a model file says about itself, read from its header without torch: safetensors and GGUF
headers, LoRA key layouts, quantization.
"""
