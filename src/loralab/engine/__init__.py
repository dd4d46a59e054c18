"""Generation as a library: settings, KV cache, forward passes, the decode loop and the
adapters' LoRA weights. `loralab eval`, `predict`, `chat` and `serve` call it; it imports
nothing from them.
"""
