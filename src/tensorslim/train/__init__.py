"""Training and fine-tuning loops."""

from tensorslim.train.loop import accuracy, fit

__all__ = ["accuracy", "fit"]
