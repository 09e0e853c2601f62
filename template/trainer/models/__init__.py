"""Models: the base model brought into models/ (base_model, from a folder or a GGUF file),
tiny models of the real architectures (tiny_model), the check that both engines read a model
alike (checks), the model facts mlx needs (model_config), LoRA adapters in either engine's
format (adapters), merging and fusing them (merge), and what llama.cpp can take (gguf_support)."""
