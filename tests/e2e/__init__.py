"""A daemon rendering jobs end to end: the hot folder, LoRA jobs, sweeps, hires, img2img,
re-renders, webhooks, submit, the report, plugin boundaries, the command line."""
