"""Evaluation: a stage's adapter against the base model on held-out rows, with metrics,
thresholds and forgetting (evaluation), and answering prompts with a run's adapter or an
export on either engine (generation)."""
