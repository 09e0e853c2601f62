"""Quality weighting: what 'high quality' means and the weight it earns (pure Python,
so the dataset report can state the weights without the training engines)."""

from __future__ import annotations

from typing import Any, Optional


def weight(quality: Optional[float], multiplier: float, threshold: float, enabled: bool) -> float:
    """A row with quality >= threshold is drawn `multiplier` times as often as the others."""
    return multiplier if enabled and quality is not None and quality >= threshold else 1.0


def summary(qualities: list[Optional[float]], multiplier: float, threshold: float, enabled: bool) -> dict[str, Any]:
    """The effective weights of a training set, for the quality report and the manifest."""
    weights = [weight(q, multiplier, threshold, enabled) for q in qualities]
    high = sum(1 for w in weights if w > 1)
    total = sum(weights) or 1.0
    return {
        "enabled": enabled,
        "multiplier": multiplier,
        "threshold": threshold,
        "rows": len(weights),
        "high_quality_rows": high,
        "other_rows": len(weights) - high,
        "row_share_high_quality": round(high / max(1, len(weights)), 4),
        # the share of draws that go to high-quality rows
        "sampling_share_high_quality": round(sum(w for w in weights if w > 1) / total, 4),
    }
