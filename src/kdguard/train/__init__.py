"""One trainer for teachers, students (via distillers) and fine-tuning defences."""

from .trainer import EpochRecord, Trainer, lr_factor

__all__ = ["EpochRecord", "Trainer", "lr_factor"]
