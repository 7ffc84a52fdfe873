"""Stable Diffusion 1.5 as a lorafarm family plugin; the family is in `lorafarm_sd15.family`."""
