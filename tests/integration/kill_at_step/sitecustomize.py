"""Test-only: SIGKILL a training process when it reports step $KILL_AT_STEP (no cleanup).

The resume tests put this folder on PYTHONPATH, so every Python process of the run (the
launcher's ranks too) imports it at startup; production code carries no kill hook. The kill
comes at the end of the step, after its metrics row and before its checkpoint.
"""

import os
import signal

if os.environ.get("KILL_AT_STEP"):
    from loralab.train.progress import StepProgress

    _update = StepProgress.update

    def _update_then_kill(self, step, *args, **kwargs):
        _update(self, step, *args, **kwargs)
        if str(step) == os.environ["KILL_AT_STEP"]:
            os.kill(os.getpid(), signal.SIGKILL)

    StepProgress.update = _update_then_kill
