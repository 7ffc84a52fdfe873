"""Renders and jobs after intake: the claim, state changes, pause/cancel/retry, farm hosts."""
