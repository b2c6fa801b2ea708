"""One training step, (b) against (c), counted: ``python benchmarks/step_profile.py DATA_DIR [--device cuda]``.

Runs (b), the plain in-memory loop (one epoch), and (c), the fit with default.yaml (validation off, one
epoch cut short), in one process, each twice. The first passes time a window of training steps on the
host, with no profiler yet; the second passes count, over a window of each, with torch.profiler: the ops
dispatched and, on CUDA, the kernels launched, the waits for the GPU inside ops and the GPU's busy time,
per step. On CUDA a last window runs under ``torch.cuda.set_sync_debug_mode`` and lists the Python lines
that made the host wait for the GPU. One small op's host time, before and after the profiling, prices an op.
Timers cannot split an asynchronous GPU step the way step_breakdown.py splits a CPU one; counts can.
"""

import argparse
import collections
import contextlib
import linecache
import os
import shlex
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from baselines import in_memory  # noqa: E402

LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch"}
WAITS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}


def is_sync_warning(message: str) -> bool:
    """A sync that debug mode caught; not its notice, on the first switch, that it is a prototype."""
    return "called a synchronizing CUDA operation" in message


class Windows:
    """Called at the start of every training step. A timing pass warms up, then times ``steps`` steps; a
    counting pass warms up, profiles, then (CUDA) watches for syncs.

    Both sides' timing passes run before any counting pass, so that no profiler has run in the process
    when a window is timed: on an H100, (c)'s window timed after (b)'s profiled one came out 1.5x its
    whole fit's time per step. The cause was not found; kineto leaving CUPTI attached after profiling
    (pytorch#144455) is one candidate, which the small op's cost before and after did not confirm.
    """

    def __init__(self, steps: int, device: str, timing: bool):
        warm = profiled = max(steps // 5, 5)
        self.timing, self.cuda = timing, device == "cuda"
        # The counting pass starts where the timing pass ends, the profiled window where the one-pass
        # version had it, so that op counts stay comparable with earlier runs.
        timed_end = warm + steps
        self.marks = [warm, timed_end] if timing else [timed_end, timed_end + profiled, timed_end + 2 * profiled]
        # Both passes need the counting pass's steps: a short epoch is refused in the timing pass, before
        # any profiler runs (one left running as the process exits crashes it).
        self.total = timed_end + 2 * profiled + 1
        self.step, self.ms_per_step, self.prof, self.syncs = 0, None, None, collections.Counter()
        self.sync_lines = {}
        self.watching = contextlib.ExitStack()

    def tick(self) -> None:
        (self._time if self.timing else self._count)()
        self.step += 1

    def _time(self) -> None:
        start, end = self.marks
        if self.step in self.marks and self.cuda:
            torch.cuda.synchronize()
        if self.step == start:
            self.start = time.perf_counter()
        elif self.step == end:
            self.ms_per_step = 1000 * (time.perf_counter() - self.start) / (end - start)

    def _count(self) -> None:
        start, profiled_end, watched_end = self.marks
        if self.step == start:
            if self.cuda:  # the GPU's busy time counts this window's kernels only
                torch.cuda.synchronize()
            activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * self.cuda
            self.prof = profile(activities=activities)
            self.prof.__enter__()
        elif self.step == profiled_end:
            self.prof.__exit__(None, None, None)
            self.profiled_steps = profiled_end - start
            if self.cuda:
                self.caught = self.watching.enter_context(warnings.catch_warnings(record=True))
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
        elif self.step == watched_end and self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self.watching.close()
            for w in self.caught:
                if is_sync_warning(str(w.message)):
                    where = w.filename.split("site-packages/")[-1]  # torch/cuda/__init__.py, not __init__.py
                    self.syncs[f"{where}:{w.lineno}"] += 1
                    self.sync_lines[f"{where}:{w.lineno}"] = linecache.getline(w.filename, w.lineno).strip()
            self.watched_steps = watched_end - profiled_end

    def finished(self) -> "Windows":
        if self.step < self.total:
            raise SystemExit(f"the epoch ended at step {self.step}, before step {self.total}: use fewer --steps")
        return self

    def counts(self) -> dict:
        """Per step: ops, kernel launches, waits, GPU busy ms; and each op's count."""
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
            "ops/step": sum(ops.values()) / n,
            "kernel launches/step": sum(e.name in LAUNCHES for e in events) / n if self.cuda else None,
            # Inside an op or range only: leaving the profiler synchronises too, at the top level.
            "waits for the GPU in ops/step": sum(e.name in WAITS and e.cpu_parent is not None for e in events) / n
            if self.cuda
            else None,
            "GPU busy ms/step": sum(kernels.values()) if self.cuda else None,
            "per op": {name: count / n for name, count in ops.items()},
        }


def plain(data_dir: str, device: str, batch_size: int, windows: Windows) -> Windows:
    in_memory(data_dir, epochs=1, batch_size=batch_size, device=device, on_step=windows.tick)
    return windows.finished()


def fit(data_dir: str, device: str, batch_size: int, windows: Windows, fit_args: list[str]) -> Windows:
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
    return windows.finished()


def small_op_us(device: str, calls: int = 5000) -> float:
    """Host microseconds for one tiny op issued from Python (an add_ on one element): what each extra op
    or kernel launch in the table costs, give or take, when the host sets the pace."""
    t = torch.zeros(1, device=device)
    for _ in range(100):  # warm-up: the kernel's first load
        t.add_(1)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        t.add_(1)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


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
    sides = {
        "(b)": partial(plain, data_dir, args.device, args.batch_size),
        "(c)": partial(fit, data_dir, args.device, args.batch_size, fit_args=args.fit_args),
    }
    timed = {name: run(Windows(args.steps, args.device, timing=True)) for name, run in sides.items()}
    small_op_before = small_op_us(args.device)
    windows = {name: run(Windows(args.steps, args.device, timing=False)) for name, run in sides.items()}
    small_op_after = small_op_us(args.device)
    results = {name: {"host ms/step (timed)": timed[name].ms_per_step, **w.counts()} for name, w in windows.items()}
    print(f"\ndevice {args.device}, batch {args.batch_size}, {args.steps} steps timed\n")
    print("| per training step | (b) plain loop | (c) fit | c - b |\n|---|---|---|---|")
    for key, b in results["(b)"].items():
        c = results["(c)"][key]
        if key != "per op" and b is not None:
            print(f"| {key} | {b:.3f} | {c:.3f} | {c - b:+.3f} |")
    b_ops, c_ops = results["(b)"]["per op"], results["(c)"]["per op"]
    extra = {name: c_ops.get(name, 0) - b_ops.get(name, 0) for name in b_ops.keys() | c_ops.keys()}
    print(
        "\none small op from Python (add_ on one element), us on the host: "
        f"{small_op_before:.1f} before any profiling, {small_op_after:.1f} after"
    )
    print("ops per step, (c) minus (b):", ", ".join(f"{n} {d:+.2f}" for n, d in sorted(extra.items()) if d))
    for name, w in windows.items():
        if w.cuda:
            print(f"{name}: GPU ms/step by kernel:", ", ".join(f"{k} {ms:.3f}" for k, ms in w.top_kernels))
            lines = ", ".join(f"{where} x{count}" for where, count in w.syncs.most_common()) or "none"
            # The line's text too: a line number alone means little in another torch version.
            lines += "".join(f"\n  {where}: {text}" for where, text in w.sync_lines.items())
            print(f"{name}: {sum(w.syncs.values())} syncs in {w.watched_steps} steps under sync debug mode: {lines}")


if __name__ == "__main__":
    main()
