"""A small, deterministic training loop shared by teacher fine-tuning and student training.

The caller supplies the batches of each epoch and a loss function returning named terms; this
module owns the optimizer (AdamW, linear warmup then linear decay), checkpoints (one per epoch,
written under a temporary name, then renamed), resume, a progress bar, log lines and JSONL
metrics. Batches are assembled in a background thread so data loading overlaps compute; the
share of time the loop waited for data is logged.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.fsio import atomic_path
from pipeline.models import load_model

log = logging.getLogger(__name__)

LossFn = Callable[[object], dict[str, torch.Tensor]]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


@dataclass
class Schedule:
    epochs: int
    steps_per_epoch: int
    lr: float
    warmup_steps: int
    weight_decay: float = 0.01
    log_every: int = 20
    grad_clip: float = 1.0

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def lr_factor(self, step: int) -> float:
        """Linear warmup to 1 over `warmup_steps`, then linear decay to 0 at the last step."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        remaining = self.total_steps - self.warmup_steps
        return max(0.0, 1.0 - (step - self.warmup_steps) / max(1, remaining))


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0
    history: list[dict] = field(default_factory=list)


def _prefetch(batches: Iterator, depth: int = 2) -> Iterator:
    """Run the batch iterator in a thread, `depth` batches ahead."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def worker() -> None:
        try:
            for batch in batches:
                buffer.put(batch)
        except BaseException as error:  # handed to the consumer, which re-raises it
            buffer.put(error)
        buffer.put(done)

    threading.Thread(target=worker, daemon=True).start()
    while (item := buffer.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


class Trainer:
    """Owns optimisation, checkpoints and metrics for one model in `out_dir`."""

    def __init__(self, model: torch.nn.Module, schedule: Schedule, out_dir: Path, seed: int):
        self.model, self.schedule, self.out_dir, self.seed = model, schedule, Path(out_dir), seed
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule.lr_factor)
        self.state = TrainState()
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self._probe: Callable[[], dict] | None = None  # set by fit
        self._probe_every = 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def resume(self) -> bool:
        """Load the last epoch checkpoint if there is one; True when resumed."""
        if not (self.checkpoint_dir / "trainer.pt").is_file():
            return False
        saved = load_model(self.checkpoint_dir)
        self.model.load_state_dict(saved.state_dict())
        extra = torch.load(self.checkpoint_dir / "trainer.pt", weights_only=False)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        self.state = TrainState(**extra["state"])
        torch.set_rng_state(extra["torch_rng"])
        self._truncate_metrics()
        log.info("resumed from %s at epoch %d", self.checkpoint_dir, self.state.epoch)
        return True

    def _truncate_metrics(self) -> None:
        """Drop metric lines logged after the checkpoint, so a resumed log reads as one run."""
        if not self.metrics_path.exists():
            return
        lines = [line for line in self.metrics_path.read_text().splitlines() if line]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= self.state.step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def save_checkpoint(self) -> None:
        with atomic_path(self.checkpoint_dir) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "state": vars(self.state),
                    "torch_rng": torch.get_rng_state(),
                },
                tmp / "trainer.pt",
            )

    def fit(
        self,
        epoch_batches: Callable[[int], Iterator],
        loss_fn: LossFn,
        pairs_per_batch: int,
        on_epoch_end: Callable[[int], dict] | None = None,
        probe: Callable[[], dict] | None = None,
        probe_every: int = 0,
    ) -> TrainState:
        """Train the remaining epochs. `epoch_batches(epoch)` must be a pure function of the
        epoch (seeded), which is what makes a resumed run equal an uninterrupted one.

        `probe`, when given, measures the model before the first step and after every
        `probe_every` steps (0: only before the first step); each result is logged as a
        "probe" record with the step and the epochs done as a fraction."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._probe, self._probe_every = probe, probe_every
        if self.state.step == 0:
            self.metrics_path.unlink(missing_ok=True)  # a fresh run never appends to an old log
            self._run_probe()
        bar = tqdm(
            total=self.schedule.total_steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        for epoch in range(self.state.epoch, self.schedule.epochs):
            self._epoch(epoch, epoch_batches(epoch), loss_fn, pairs_per_batch, bar)
            extra = on_epoch_end(epoch) if on_epoch_end else {}
            self.state.epoch = epoch + 1
            self._write_metrics(
                {"event": "epoch", "epoch": epoch + 1, "step": self.state.step, **extra}
            )
            self.save_checkpoint()
        bar.close()
        return self.state

    def _epoch(self, epoch: int, batches: Iterator, loss_fn: LossFn, pairs: int, bar) -> None:
        self.model.train()
        window = _Window()
        fetch_start = time.perf_counter()
        for batch in _prefetch(batches):
            window.wait += time.perf_counter() - fetch_start
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
            terms = self._step(batch, loss_fn)
            window.add(terms, pairs)
            bar.update(1)
            if self.state.step % self.schedule.log_every == 0:
                record = window.flush(self.state.step, epoch, lr)
                bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
                self._write_metrics(record)
            if self._probe_every and self.state.step % self._probe_every == 0:
                self._run_probe()
            fetch_start = time.perf_counter()
        self.model.eval()

    def _run_probe(self) -> None:
        if self._probe is None:
            return
        measured = self._probe()
        self.model.train()  # a probe may switch the model to eval mode
        epochs = self.state.step / self.schedule.steps_per_epoch
        self._write_metrics(
            {"event": "probe", "step": self.state.step, "epoch": round(epochs, 4), **measured}
        )

    def _step(self, batch: object, loss_fn: LossFn) -> dict[str, float]:
        terms = loss_fn(batch)
        total = terms["total"]
        if not torch.isfinite(total):
            self._fail(f"non-finite loss {total.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.schedule.grad_clip)
        if not torch.isfinite(grad_norm):
            # stop before the update: a NaN step would reach the next epoch's checkpoint
            self._fail(f"non-finite gradient norm {grad_norm.item()}")
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        return {name: float(value.detach()) for name, value in terms.items()}

    def _fail(self, problem: str) -> None:
        if self.state.epoch:
            last = f"the last good checkpoint is {self.checkpoint_dir} (epoch {self.state.epoch})"
        else:
            last = "no epoch finished, so there is no checkpoint"
        raise TrainingError(
            f"{problem} at step {self.state.step + 1}; {last}; lower the learning rate or check "
            "the inputs"
        )

    def _write_metrics(self, record: dict) -> None:
        self.state.history.append(record)
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if record.get("event") == "step":
            log.info(
                "step %d/%d loss %.4f lr %.2e %.0f pairs/s data-wait %.0f%%",
                record["step"],
                self.schedule.total_steps,
                record["loss"],
                record["lr"],
                record["pairs_per_s"],
                100 * record["data_wait"],
            )


class _Window:
    """Running sums of loss terms and timings between two log lines."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.wait, self.pairs, self.steps = 0.0, 0, 0
        self.sums: dict[str, float] = {}

    def add(self, terms: dict[str, float], pairs: int) -> None:
        self.steps += 1
        self.pairs += pairs
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def flush(self, step: int, epoch: int, lr: float) -> dict:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        record = {
            "event": "step",
            "step": step,
            "epoch": epoch,
            "lr": lr,
            "pairs_per_s": self.pairs / seconds,
            "data_wait": self.wait / seconds,
        }
        record.update({name: total / self.steps for name, total in self.sums.items()})
        record["loss"] = record.get("total", math.nan)
        self.__init__()
        return record
