"""`--engine naive`: transformers' `generate` per request, one request at a time.

The baseline the benchmark measures the continuous engine against (and a way to serve models
or adapters the continuous engine does not take): same app, queue, metrics and adapter API;
adapters are attached with PEFT and picked per request with set_adapter.
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from loralab.serve.scheduler import Request, Scheduler, engine_error, unloaded_message


class _NoBatch:
    """What the shared scheduler code expects of a batch, for one request at a time."""

    max_len = 1 << 30
    free_rows = [0]

    def free(self, row: int) -> None:
        pass


class NaiveAdapters:
    """Adapters attached to the base with PEFT, one PEFT adapter name per engine id."""

    def __init__(self, model: Any) -> None:
        self.base, self.peft = model, None
        self.ids: set[int] = set()  # engine ids of the attached adapters
        self.sizes: dict[int, int] = {}  # their file sizes

    def read(self, path: Path) -> tuple[Any, int]:
        from loralab.engine.lora_weights import check_adapter_file

        file = check_adapter_file(path)
        return path, file.stat().st_size

    def add(self, adapter: Any, payload: Any) -> None:
        from peft import PeftModel

        from loralab.model.quiet import quiet_hf

        with quiet_hf():
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(payload),
                                                      adapter_name=f"a{adapter.id}")
                self.peft.eval()
            else:
                self.peft.load_adapter(str(payload), adapter_name=f"a{adapter.id}")
        self.ids.add(adapter.id)
        self.sizes[adapter.id] = adapter.nbytes

    def remove(self, adapter: Any) -> None:
        self.ids.discard(adapter.id)
        self.sizes.pop(adapter.id, None)
        if self.peft is not None:
            self.peft.delete_adapter(f"a{adapter.id}")

    def total_bytes(self, extra: list[Any]) -> int:
        """The attached adapters' file sizes plus those of `extra` (read payloads: folders)."""
        from loralab.engine.lora_weights import check_adapter_file

        return sum(self.sizes.values()) + sum(check_adapter_file(p).stat().st_size
                                              for p in extra)

    def model_for(self, adapter: int) -> Any:
        """(model, context) generating with adapter id `adapter` (0: the base)."""
        if self.peft is None:
            return self.base, nullcontext()
        if adapter == 0:
            return self.peft, self.peft.disable_adapter()
        self.peft.set_adapter(f"a{adapter}")
        return self.peft, nullcontext()


class NaiveScheduler(Scheduler):
    """The scheduler's queue and control calls, but each request is one `generate` call."""

    def __init__(self, adapters: NaiveAdapters, pad_id: int, stop_ids: list[int],
                 max_queue: int, metrics: Any) -> None:
        super().__init__(_NoBatch(), stop_ids, max_queue, metrics)
        self.adapters, self.pad_id = adapters, pad_id

    def _loop(self) -> None:
        while self._next_work(busy=False):  # one request at a time: nothing runs between
            out: list = []
            self._drop_finished(out)
            if out:
                self._send(out)
            with self.wake:
                job = self.waiting.popleft() if self.waiting else None
            if job is not None:
                self.running[0] = job
                self._send(self._generate(job))
                self.running.pop(0, None)
        self._fail_all("the server is shutting down", 503)

    def _generate(self, job: Request) -> list:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        sched = self

        class Stream(BaseStreamer):
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate hands the prompt over first
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    sched._on_token(job, int(token))

            def end(self) -> None:
                pass

        class Halt(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                halt = job.cancelled or time.monotonic() > job.deadline
                return torch.full((input_ids.shape[0],), halt, dtype=torch.bool,
                                  device=input_ids.device)

        if job.adapter and job.adapter not in self.adapters.ids:  # unloaded since it resolved
            self.metrics.finished(job, "unloaded")
            return [(job, ("error", 409, unloaded_message(job.model)))]
        model, context = self.adapters.model_for(job.adapter)
        device = next(model.parameters()).device
        ids = torch.tensor([job.prompt_ids], device=device)
        sampling = job.sampling
        kwargs: dict[str, Any] = dict(max_new_tokens=job.max_tokens, eos_token_id=sorted(
            self.stop_ids), pad_token_id=self.pad_id, repetition_penalty=1.0,
            do_sample=sampling.temperature > 0, use_cache=True)
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed if sampling.seed is not None else time.time_ns())
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        try:
            with context, torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               streamer=Stream(), stopping_criteria=StoppingCriteriaList([Halt()]),
                               **kwargs)
        except Exception as exc:  # this request fails; the server goes on
            self.metrics.finished(job, "error")
            return [(job, engine_error(exc))]
        return self._ending(job)

    def _on_token(self, job: Request, token: int) -> None:
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
            self.metrics.first_token(job, job.first_token_at - job.arrived)
        job.generated += 1
        job.last_token = token
        self.metrics.tokens(job.model, 1)
        self._send([(job, ("tokens", [token]))])

    def _ending(self, job: Request) -> list:
        if job.cancelled:
            self.metrics.finished(job, "stop" if job.stopped_by_text else "cancelled")
            return []
        if time.monotonic() > job.deadline:
            self.metrics.finished(job, "timeout")
            return [(job, ("error", 504, "the request timed out"))]
        reason = "stop" if job.last_token in self.stop_ids else "length"
        self.metrics.finished(job, reason)
        return [(job, ("done", reason))]
