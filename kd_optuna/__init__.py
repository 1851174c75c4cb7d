"""kd-optuna: KD-Zero's distiller search on Optuna."""

__version__ = "0.1.0"
