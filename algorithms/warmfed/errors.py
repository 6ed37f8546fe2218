"""WarmFed's user-facing errors (bad backbone path, mismatched LoRA), printed as one line by the CLI."""

from algorithms.warmfed.diffusion import BackboneError
from algorithms.warmfed.lora import LoraMismatchError

WARMFED_ERRORS: tuple[type[Exception], ...] = (BackboneError, LoraMismatchError)
