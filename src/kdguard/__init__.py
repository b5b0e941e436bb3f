"""kdguard: knowledge distillation from teachers that may be backdoored."""

__version__ = "0.1.0"
