"""The hooks the training loop calls, in the style of mlx-lm's tuner/callbacks.py: run status,
progress lines, emissions probes and experiment tracking are each one TrainingCallback."""

from __future__ import annotations

from typing import Any


class TrainingCallback:
    """Hooks in the style of mlx-lm's tuner callbacks; `info` is one metrics record."""

    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        pass

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        pass

    def on_first_step(self, info: dict[str, Any]) -> None:
        """After the stage's first iteration: its pace (info["eta"]) before any report."""
