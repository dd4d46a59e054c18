"""Evaluation: generation over the eval records (base, adapters, checkpoints) and the commands
`loralab eval`, `predict` and `chat`. Scoring the generations is `loralab.scoring`'s (torch-free).
"""
