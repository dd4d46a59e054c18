"""Silence transformers' and PEFT's noise around one call, not for the whole process.

Every command printed transformers' "Loading weights" bar (a tiny model, a 7B alike) and PEFT's
FutureWarning about `is_gradient_checkpointing` (PEFT reads that deprecated property when it
wraps a model): neither tells the user anything. Other warnings still show.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

DEPRECATED_CHECKPOINTING = r".*is_gradient_checkpointing.*"


@contextmanager
def quiet_hf() -> Iterator[None]:
    """No weight-loading progress bar and no `is_gradient_checkpointing` FutureWarning inside."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    if bar_was_on:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=DEPRECATED_CHECKPOINTING,
                                    category=FutureWarning)
            yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
