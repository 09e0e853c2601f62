"""Does a model folder mean the same in both engines? Its logits for one chat prompt in
transformers and, when installed, mlx-lm, compared. Run on every tiny model built, and on
every base model brought into models/ (a real model's half-precision weights round more)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from trainer.errors import ProjectError
from trainer.models.model_config import mlx_overrides


class ModelCheckError(ProjectError):
    kind = "model_check_error"


def check(path: Path, relative: Optional[float] = None) -> dict[str, Any]:
    """Load the model with transformers and, if installed, mlx-lm; compare their logits: at most
    1e-3 apart, or `relative` times the largest logit (half-precision weights round more)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits.float().numpy()
    result: dict[str, Any] = {"transformers": True, "prompt_tokens": len(ids)}
    try:
        import mlx.core as mx
        import mlx_lm
        import numpy as np
    except ImportError:
        result["mlx"] = "skipped (mlx-lm not installed)"
        return result
    mlx_model, _ = mlx_lm.load(str(path), model_config=mlx_overrides(path))
    logits = np.array(mlx_model(mx.array([ids])).astype(mx.float32))
    difference = float(np.abs(logits - reference).max())
    limit = 1e-3 if relative is None else relative * max(1.0, float(np.abs(reference).max()))
    same_next = bool((logits[0].argmax(-1) == reference[0].argmax(-1)).mean() == 1.0)
    result.update({"mlx": True, "max_logit_difference": difference, "tolerance": limit,
                   "same_greedy_tokens": same_next})
    if difference > limit:
        raise ModelCheckError(f"mlx-lm and transformers disagree on {path}: max logit difference {difference:g} "
                             f"(tolerance {limit:g})")
    return result
