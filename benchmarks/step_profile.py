"""One training step, (b) against (c), counted: ``python benchmarks/step_profile.py DATA_DIR [--device cuda]``.

Runs (b), the plain in-memory loop, then (c), the fit with default.yaml (validation off), in one process,
and over a window of training steps of each counts with torch.profiler: the ops dispatched and, on CUDA,
the kernels launched, the waits for the GPU inside ops and the GPU's busy time, per step. The host time
per step is timed over an earlier window, without the profiler. On CUDA a last window runs under
``torch.cuda.set_sync_debug_mode`` and lists the Python lines that made the host wait for the GPU.
Timers cannot split an asynchronous GPU step the way step_breakdown.py splits a CPU one; counts can.
"""

import argparse
import collections
import contextlib
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from baselines import in_memory  # noqa: E402

LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch"}
WAITS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}


class Windows:
    """Called at the start of every training step: warm up, time, profile, then (CUDA) watch for syncs."""

    def __init__(self, steps: int, device: str):
        warm = profiled = max(steps // 5, 5)
        self.marks = [warm, warm + steps, warm + steps + profiled, warm + steps + 2 * profiled]
        self.cuda = device == "cuda"
        self.step, self.ms_per_step, self.prof, self.syncs = 0, None, None, collections.Counter()
        self.watching = contextlib.ExitStack()

    @property
    def total(self) -> int:
        return self.marks[-1] + 1

    def tick(self) -> None:
        start, timed_end, profiled_end, watched_end = self.marks
        if self.step in (start, timed_end) and self.cuda:
            torch.cuda.synchronize()
        if self.step == start:
            self.start = time.perf_counter()
        elif self.step == timed_end:
            self.ms_per_step = 1000 * (time.perf_counter() - self.start) / (timed_end - start)
            activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * self.cuda
            self.prof = profile(activities=activities)
            self.prof.__enter__()
        elif self.step == profiled_end:
            self.prof.__exit__(None, None, None)
            self.profiled_steps = profiled_end - timed_end
            if self.cuda:
                self.caught = self.watching.enter_context(warnings.catch_warnings(record=True))
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
        elif self.step == watched_end and self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self.watching.close()
            for w in self.caught:
                if "synchroniz" in str(w.message):
                    where = w.filename.split("site-packages/")[-1]  # torch/cuda/__init__.py, not __init__.py
                    self.syncs[f"{where}:{w.lineno}"] += 1
            self.watched_steps = watched_end - profiled_end
        self.step += 1

    def counts(self) -> dict:
        """Per step: host ms, ops, kernel launches, waits, GPU busy ms; and each op's count."""
        if self.step < self.total:
            raise SystemExit(f"the epoch ended at step {self.step}, before step {self.total}: use fewer --steps")
        events = self.prof.events()
        ops = collections.Counter()
        for e in events:
            parent, nested = e.cpu_parent, False
            while parent is not None and not nested:
                nested, parent = parent.name.startswith("aten::"), parent.cpu_parent
            if e.name.startswith("aten::") and not nested:
                ops[e.name] += 1
        n = self.profiled_steps
        kernels = collections.Counter()
        # Kernels and copies only: a record_function range (Optimizer.step, with the whole forward and
        # backward inside it under Lightning's closure) is drawn on the GPU's timeline too.
        host_ranges = {e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU}
        for e in events:
            annotation = getattr(e, "is_user_annotation", False) or e.name in host_ranges
            if e.device_type == torch.autograd.DeviceType.CUDA and not annotation:
                kernels[e.name[:60]] += e.device_time / 1000 / self.profiled_steps
        self.top_kernels = kernels.most_common(6)
        return {
            "host ms/step (timed)": self.ms_per_step,
            "ops/step": sum(ops.values()) / n,
            "kernel launches/step": sum(e.name in LAUNCHES for e in events) / n if self.cuda else None,
            # Inside an op or range only: leaving the profiler synchronises too, at the top level.
            "waits for the GPU in ops/step": sum(e.name in WAITS and e.cpu_parent is not None for e in events) / n
            if self.cuda
            else None,
            "GPU busy ms/step": sum(kernels.values()) if self.cuda else None,
            "per op": {name: count / n for name, count in ops.items()},
        }


def plain(data_dir: str, device: str, batch_size: int, windows: Windows) -> dict:
    in_memory(data_dir, epochs=1, batch_size=batch_size, device=device, on_step=windows.tick)
    return windows.counts()


def fit(data_dir: str, device: str, batch_size: int, windows: Windows, fit_args: list[str]) -> dict:
    from mnist_lightning.fit import cli_main
    from mnist_lightning.model import MNISTClassifier

    # A benchmark's shortcut: the fit has no way in for a callback object, so its module gets the hook.
    MNISTClassifier.on_train_batch_start = lambda self, batch, batch_idx: windows.tick()
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the run folder, lightning_logs/, goes here
        try:
            cli_main(
                [
                    *fit_args,
                    "--data.data_dir",
                    data_dir,
                    "--data.batch_size",
                    str(batch_size),
                    "--trainer.max_epochs",
                    "1",
                ]
                + ["--trainer.limit_train_batches", str(windows.total), "--trainer.limit_val_batches", "0"]
                + ["--trainer.accelerator", "gpu" if device == "cuda" else "cpu"]
            )
        finally:
            os.chdir(here)
    return windows.counts()


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of steps, 1 or more, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="folder holding MNIST/raw/")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=128, help="default.yaml's")
    parser.add_argument("--steps", type=positive, default=200, help="steps timed; a fifth as many warm up, and profile")
    parser.add_argument("--fit-args", type=shlex.split, default=[], help="extra options for (c)")
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    windows = {"(b)": Windows(args.steps, args.device), "(c)": Windows(args.steps, args.device)}
    results = {
        "(b)": plain(data_dir, args.device, args.batch_size, windows["(b)"]),
        "(c)": fit(data_dir, args.device, args.batch_size, windows["(c)"], args.fit_args),
    }
    print(f"\ndevice {args.device}, batch {args.batch_size}, {args.steps} steps timed\n")
    print("| per training step | (b) plain loop | (c) fit | c - b |\n|---|---|---|---|")
    for key, b in results["(b)"].items():
        c = results["(c)"][key]
        if key != "per op" and b is not None:
            print(f"| {key} | {b:.3f} | {c:.3f} | {c - b:+.3f} |")
    b_ops, c_ops = results["(b)"]["per op"], results["(c)"]["per op"]
    extra = {name: c_ops.get(name, 0) - b_ops.get(name, 0) for name in b_ops.keys() | c_ops.keys()}
    print("\nops per step, (c) minus (b):", ", ".join(f"{n} {d:+.2f}" for n, d in sorted(extra.items()) if d))
    for name, w in windows.items():
        if w.cuda:
            print(f"{name}: GPU ms/step by kernel:", ", ".join(f"{k} {ms:.3f}" for k, ms in w.top_kernels))
            lines = ", ".join(f"{where} x{count}" for where, count in w.syncs.most_common()) or "none"
            print(f"{name}: {sum(w.syncs.values())} syncs in {w.watched_steps} steps under sync debug mode: {lines}")


if __name__ == "__main__":
    main()
