"""Workarounds for Lightning's and torch's own per-step overhead, which dwarfs this small MLP's arithmetic.

None of them changes what a run computes beyond rounding, only its time. Each gain below is a whole
default fit on a 2-core CPU with that speedup alone off against all on, medians of five runs taking
turns (benchmarks/README.md; this machine's noise is 10-20%). All together they take the loop from 6.5
to 4.6 s and the run from 13.6 to 9.6 s. ``MNIST_LIGHTNING_SPEEDUPS=none`` turns them all off, and a
comma-separated list of names keeps only those on.
"""

import contextlib
import gc
import os
import sys

import torch
from lightning.pytorch.profilers import PassThroughProfiler
from torch import nn
from torch.nn import functional as F

from mnist_lightning.errors import UserError

NAMES = ("loss", "profiler", "nvml", "progress_bar", "exit_gc")
_active: frozenset[str] | None = None  # read from the environment at first use (spawned DDP workers too)


def configure(setting: str | None = None) -> frozenset[str]:
    """Read the switch (``all``, ``none`` or names); fit calls this once per run, before building anything."""
    global _active
    setting = os.environ.get("MNIST_LIGHTNING_SPEEDUPS", "all") if setting is None else setting
    names = {n.strip() for n in setting.split(",") if n.strip()}
    if names == {"all"}:
        names = set(NAMES)
    elif names == {"none"}:
        names = set()
    elif unknown := names - set(NAMES):
        raise UserError(
            f"MNIST_LIGHTNING_SPEEDUPS names {', '.join(sorted(unknown))}; use all, none or some of {', '.join(NAMES)}"
        )
    _active = frozenset(names)
    return _active


def on(name: str) -> bool:
    return name in (configure() if _active is None else _active)


class SmoothedCrossEntropy(nn.Module):
    """``nn.CrossEntropyLoss(label_smoothing=s)`` on class indices, as one dot product of weights and
    log-probabilities: 4 compute ops forward and 2 backward, where torch's label-smoothing path takes
    a dozen. The same loss and gradients to rounding (tested). Gain: 0.5-0.7 s of a default loop,
    7% of a whole default fit. Without smoothing, or with the ``loss`` speedup off, it is torch's own.
    """

    def __init__(self, label_smoothing: float = 0.0, classes: int = 10):
        super().__init__()
        self.label_smoothing, self.classes = label_smoothing, classes

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.label_smoothing or not on("loss"):  # nothing to smooth: torch's plain loss is as fast
            return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        # The mean over the batch of -sum(soft target * log p): the soft targets, negated and divided by
        # the batch size, are the weights. Built per batch, not kept as a buffer, which DDP would
        # broadcast every step; in float32 at least, so that bf16 logits do not round them.
        dtype = torch.promote_types(logits.dtype, torch.float32)
        spread = self.label_smoothing / self.classes  # to every class; the true one gets 1 - smoothing more
        scale = -1 / max(len(target), 1)  # an empty batch has loss 0
        weights = torch.full_like(logits, spread * scale, dtype=dtype)
        weights.scatter_(1, target.unsqueeze(1), (1 - self.label_smoothing + spread) * scale)
        return torch.dot(weights.flatten(), logits.log_softmax(1, dtype=dtype).flatten())


class NoProfiler(PassThroughProfiler):
    """Lightning's default profiler records nothing, but enters a new generator-based context manager around
    every hook call, ~47 times a training step. This one hands back one shared no-op context.
    Gain: 0.25 s of a 4.6 s default loop."""

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return self._nothing


def trainer_kwargs(profiler) -> dict:
    """The no-op profiler for fit's Trainer, unless one is asked for."""
    return {"profiler": NoProfiler()} if profiler is None and on("profiler") else {}


def bar_refresh_rate() -> int:
    """Lightning's bar redraws after every step: on a terminal that was 0.3 ms of a 0.8 ms step at batch 64.
    Every 20th step still looks live. Gain, on a terminal only: tutorial.yaml's step 1.04 -> 0.83 ms."""
    return 20 if on("progress_bar") else 1


def skip_nvml_probe() -> None:
    """Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, so that asking whether CUDA exists never initialises
    it (a forked DDP worker could not use it then). torch's optimizers ask on every step, and with no
    NVIDIA driver each NVML probe loads the library again: 31 us a call. With no GPU there is nothing to
    initialise, and the plain check answers in under a microsecond. Gain: 0.5 s of a 4.6 s default loop."""
    if on("nvml") and not torch.cuda.is_available():
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


def exit_without_gc() -> None:
    """At exit Python walks every object torch and Lightning made, looking for cycles to free: ~0.7 s of
    every fit. The process is ending and the OS frees its memory, so take them out of that walk; atexit
    handlers and module teardown still run. Gain: a process that imported
    Lightning took 0.86 s to exit, 0.17 s with it."""
    if on("exit_gc"):
        gc.freeze()
    sys.stdout.flush()
