"""Export: a trained stage as adapters, a merged Hugging Face model, an mlx model or a GGUF
file (export), written only where it may be (export_target), GGUF writing and its check in
llama.cpp (gguf_export, gguf_check), the model card (model_card) and the Hub upload (hub)."""
