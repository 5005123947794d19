"""kdpipe: streaming knowledge distillation (library)."""
