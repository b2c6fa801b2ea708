"""Workarounds for Lightning's and torch's own per-step overhead, which dwarfs this small MLP's arithmetic.

None of them changes a figure a run computes, only its time. Each one's gain was measured on a 2-core
CPU with benchmarks/speed.py (see benchmarks/README.md). ``MNIST_LIGHTNING_SPEEDUPS=none`` turns them
all off, and a comma-separated list of names keeps only those on, so that the gain of each shows.
"""

import contextlib
import gc
import os
import sys

import torch
from lightning.pytorch.profilers import PassThroughProfiler

from mnist_lightning.errors import UserError

NAMES = ("hook_names", "profiler", "nvml", "progress_bar", "exit_gc")
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


class FastHookNames:
    """A LightningModule mixin. Lightning sets ``_current_fx_name`` around every hook it calls, some 40 times
    a training step, and nn.Module.__setattr__ checks parameters, buffers and submodules each time. A plain
    string attribute needs none of those checks. Gain: ~0.05 ms a step, ~5% of a step at batch 64."""

    def __setattr__(self, name: str, value) -> None:
        if name == "_current_fx_name" and on("hook_names"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


class NoProfiler(PassThroughProfiler):
    """Lightning's default profiler records nothing, but enters a new generator-based context manager around
    every hook call, ~47 times a training step. This one hands back one shared no-op context.
    Gain: ~0.05 ms a step."""

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return self._nothing


def trainer_kwargs(profiler) -> dict:
    """The no-op profiler for fit's Trainer, unless one is asked for."""
    return {"profiler": NoProfiler()} if profiler is None and on("profiler") else {}


def bar_refresh_rate() -> int:
    """Lightning's bar redraws after every step: on a terminal that was 0.3 ms of a 0.8 ms step at batch 64.
    Every 20th step still looks live. Gain: ~35% of a step at batch 64, on a terminal only."""
    return 20 if on("progress_bar") else 1


def skip_nvml_probe() -> None:
    """Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, so that asking whether CUDA exists never initialises
    it (a forked DDP worker could not use it then). torch's optimizers ask on every step, and with no
    NVIDIA driver each NVML probe loads the library again: 31 us a call. With no GPU there is nothing to
    initialise, and the plain check answers in under a microsecond. Gain: ~0.03 ms a step without a GPU."""
    if on("nvml") and not torch.cuda.is_available():
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


def exit_without_gc() -> None:
    """At exit Python walks every object torch and Lightning made, looking for cycles to free: ~0.7 s of
    every fit. The process is ending and the OS frees its memory, so take them out of that walk; atexit
    handlers and module teardown still run. Gain: ~0.7 s a run."""
    if on("exit_gc"):
        gc.freeze()
    sys.stdout.flush()
