"""One trainer for teachers, students (via distillers) and fine-tuning defences."""

from .trainer import EpochRecord, Trainer

__all__ = ["EpochRecord", "Trainer"]
