"""Training progress when stdout is a file: one plain, flushed line per logging interval."""

from __future__ import annotations

import io

from loralab.train.progress import StepProgress, clock


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_redirected_log_gets_one_line_per_interval_and_the_last_step():
    out = io.StringIO()
    bar = StepProgress(total=7, log_every=3, stream=out)
    losses = [2.0 - 0.125 * i for i in range(1, 8)]
    for step, loss in enumerate(losses, 1):
        bar.update(step, loss, tokens_per_s=1234.0 + step,
                   eval_loss=0.75 if step == 5 else None)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["3/7", "5/7", "6/7", "7/7"]
    for line in lines:
        step = int(line.split()[1].split("/")[0])
        assert f"loss {losses[step - 1]:.4f}" in line
        assert f"tok/s {1234 + step:,}" in line and "elapsed " in line and "ETA " in line
    assert "eval_loss 0.7500" in lines[1]
    assert all("eval_loss" not in line for line in lines if not line.startswith("step 5/"))
    assert lines[-1].split("ETA ")[1].split()[0] == "0:00:00"


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    bar = StepProgress(total=2, enabled=False, stream=out)
    bar.update(1, 1.0, 10.0, eval_loss=0.5)
    bar.close()
    assert out.getvalue() == ""


def test_terminal_gets_the_bar_and_the_eval_loss_above_it():
    term = Terminal()
    bar = StepProgress(total=4, stream=term)
    bar.update(2, 1.5, 100.0, eval_loss=0.8125)
    bar.update(4, 1.25, 100.0)
    bar.close()
    text = term.getvalue()
    assert "step 2/4  eval_loss 0.8125" in text and "4/4" in text and "1.2500" in text


def test_clock():
    assert clock(None) == "-" and clock(59.6) == "0:01:00" and clock(3725) == "1:02:05"
