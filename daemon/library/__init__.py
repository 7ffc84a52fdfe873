"""The libraries a job draws on: checkpoints (the registry), LoRAs and embeddings, indexed from
their headers and sidecars.
"""
