"""Training and evaluation: ``train(TrainConfig(...)) -> TrainResult`` and ``evaluate_checkpoint``,
the API behind ``condensevit train`` / ``condensevit eval`` and the demo.

    from condensevit.train import TrainConfig, train
    result = train(TrainConfig(model="deit_tiny_patch16_224", data="digits", epochs=20,
                               model_kwargs=dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4),
                               output="runs/deit"))
    result.final_top1, result.gmacs, result.images_per_s, result.checkpoint
"""
from .engine import (NonFiniteLossError, TrainConfig, TrainResult, create_model, evaluate, evaluate_checkpoint,
                     train)

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "evaluate_checkpoint", "create_model",
           "NonFiniteLossError", "digits_recipe"]


def digits_recipe(model: str, model_kwargs: dict | None = None, output: str | None = None, **overrides) -> TrainConfig:
    """The recipe tuned for the embedded digits set on a 2-core CPU (see docs/training.md)."""
    base = dict(data="digits", epochs=30, batch_size=64, lr=1e-3, weight_decay=0.05, warmup_epochs=2,
                smoothing=0.1)
    base.update(overrides)
    return TrainConfig(model=model, model_kwargs=dict(model_kwargs or {}), output=output, **base)
