"""A job file becomes render specs: sweep axes, wildcards, prompt files, prompt tags."""
