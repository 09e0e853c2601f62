"""Runs: a run's folder under runs/ (training_run_manager): configuring it (config snapshot,
data copies with hashes, manifest), its status, its lock, cancelling and listing runs."""
