"""Training engines: the one loop both engines run and the backend interface (base_trainer),
the mlx-lm and transformers+peft backends (mlx_trainer, transformers_trainer), which one runs
(backends), data-parallel processes (distributed), and a run's stages trained in order with
resume and replay (pipeline), recording as they go (recorder)."""
