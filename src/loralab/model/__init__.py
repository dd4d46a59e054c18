"""Model loading and the builtin tokenizer."""
