"""Training: the generic loop (loop.py), its config (config.py), stages (stages.py; stage 2 is LISA's recipe,
conversations.py). ``groundseg train --config FILE``."""
from grounding.trainer import conversations as _stage2  # noqa: F401  (registers stage 2)
from grounding.trainer.config import TrainConfig
from grounding.trainer.loop import batch_indices, latest_checkpoint, plot_losses, train, warmup_cosine

__all__ = ["TrainConfig", "batch_indices", "latest_checkpoint", "plot_losses", "train", "warmup_cosine"]
