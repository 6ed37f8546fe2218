"""WarmFed: diffusion warm start (LoRA per client, server synthesis and fine-tuning) + DSD rounds."""

from algorithms.warmfed import algorithm  # noqa: F401  (registers "warmfed")
