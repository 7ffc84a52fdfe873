"""Rendering: the worker, the pipeline cache within memory budgets, LoRA patching."""
