"""Scoring without a model: task plug-ins (`tag_scores`, `generic`), the files an evaluated target
leaves on disk (`tasks`), reference predictors and bootstrap statistics.

Importable without torch (tested): `loralab report` and any analysis script use it on a machine
that has no torch.
"""
