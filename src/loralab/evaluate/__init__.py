"""Evaluation: task plug-ins (`tag_scores`, `generic`), scoring, reference predictors, bootstrap.

Scoring works from text alone; the files an evaluated target leaves on disk are described in
`loralab.evaluate.tasks` (the contract `loralab report` reads).
"""
