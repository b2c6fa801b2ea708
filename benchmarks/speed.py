"""Side-by-side training speed: ``python benchmarks/speed.py DATA_DIR [--device cuda] [--batch-sizes 64 256]``.

Every variant is its own process, timed from launch to exit, with its CPU seconds and peak RSS from wait4:
  (a) the PyTorch MNIST tutorial: per-sample ToTensor + Normalize, DataLoader, plain loop (CPU only)
  (b) the lower bound: plain loop over in-memory tensors, index-sliced batches, no DataLoader
  (c) ``python -m mnist_lightning.fit``: validation, TensorBoard, checkpoints and the final test included
With --speedups-off, each (c) runs again with MNIST_LIGHTNING_SPEEDUPS=none (what speedups.py buys), and
the default as shipped once more without each speedup in turn (what each one buys; the progress bar's only
shows on a terminal, and these runs write to a pipe);
with --against SRC, again from another checkout's src/ (e.g. a worktree of an older commit, side by side).
The training-loop time of (c) is the sum of its epochs, each with its validation and checkpoint, without the
one-time setup (decoding the files) that (b) also leaves out. With --compile [MODE], (b) and (c) both run the
network through torch.compile and their loop time is epochs 2..E scaled to E epochs, leaving compilation out.
On a shared machine the wall clock counts other processes' turns too, and a process's CPU seconds do not, with
one thread (OMP_NUM_THREADS=1); with more, each waits for the others by spinning, which counts as CPU time.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from baselines import COMPILE_MODES, loop_seconds

HERE = Path(__file__).resolve().parent
FLOPS_PER_SAMPLE = 6 * (784 * 128 + 128 * 64 + 64 * 10)  # forward + backward of the MLP's matmuls


def timed(cmd: list[str], cwd: str, env: dict | None = None) -> tuple[dict, str]:
    """Run cmd; return its wall and CPU seconds and its peak RSS in MiB, and its stdout."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: nobody reads it until the end
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            tail = "".join(err.readlines()[-15:])
            raise SystemExit(f"failed: {' '.join(cmd)}\n{tail}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024}, out


def speedup_names() -> list[str]:
    """speedups.NAMES, asked of the package that the fits import. In a child process: importing it here would
    import Lightning, which sets PYTORCH_NVML_BASED_CUDA_CHECK=1 in this process's environment, and every run
    would inherit it, (b) too, whose optimizer would then probe NVML on every step."""
    code = "from mnist_lightning.training.speedups import NAMES; print(*NAMES)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def without_each(names: list[str]) -> dict[str, str]:
    """MNIST_LIGHTNING_SPEEDUPS for each "without X" row: it lists the speedups that stay on, all but X."""
    return {name: ",".join(n for n in names if n != name) or "none" for name in names}


def baseline(which: str, data_dir: str, batch_size: int, epochs: int, device: str, compile: str | None = None) -> dict:
    cmd = [
        sys.executable,
        str(HERE / "baselines.py"),
        which,
        data_dir,
        "--batch-size",
        str(batch_size),
    ]
    cmd += ["--epochs", str(epochs)] + (["--device", device] if which == "in_memory" else [])
    cmd += ["--compile", compile] if compile else []
    times, out = timed(cmd, cwd=str(HERE))
    return {**times, **json.loads(out.strip().splitlines()[-1])}


def lightning_fit(
    data_dir: str, batch_size: int | None, epochs: int, device: str, *extra: str, env: dict | None = None
) -> dict:
    accelerator = "gpu" if device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mnist_lightning.fit", *extra, "--data.data_dir", data_dir]
        cmd += ["--data.batch_size", str(batch_size)] if batch_size else []
        cmd += ["--trainer.max_epochs", str(epochs)]
        cmd += ["--trainer.accelerator", accelerator]
        times, _ = timed(cmd, cwd=tmp, env=env)
        metrics = json.loads(next(Path(tmp).glob("lightning_logs/version_*/metrics.json")).read_text())
    return {
        **times,
        "steps": metrics["global_step"],
        "samples": metrics["train_samples"] * epochs,
        "test_acc": metrics["test/acc"],
        # The run's own resolved config says whether it compiled.
        "train_s": loop_seconds(metrics["epoch_seconds"], metrics["config"]["model"]["compile"]),
        "epoch_s": metrics["epoch_seconds"],
    }


def medians(variants: dict[str, Callable[[], dict]], repeats: int) -> dict[str, dict]:
    """Run every variant `repeats` times, taking turns, so that a slow spell of a shared machine hits them
    alike; keep each variant's run with the median training-loop time."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            runs[name].append(run())
    return {name: sorted(rs, key=lambda r: r["train_s"])[len(rs) // 2] for name, rs in runs.items()}


def row(name: str, r: dict, ref: dict) -> str:
    gflops = FLOPS_PER_SAMPLE * r["samples"] / r["train_s"] / 1e9
    ratios = "  ".join(
        f"{k}: {r['wall_s'] / v['wall_s']:.2f}x / {r['train_s'] / v['train_s']:.2f}x" for k, v in ref.items()
    )
    return (
        f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['train_s']:.2f} | {r['samples'] / r['train_s']:,.0f} "
        f"| {1000 * r['train_s'] / r['steps']:.3f} | {gflops:.1f} | {r['rss_mib']:.0f} "
        f"| {100 * r['test_acc']:.2f} | {ratios} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="folder holding MNIST/raw/")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant; the median is shown")
    parser.add_argument("--no-tutorial", action="store_true", help="skip (a), which takes 25-35 s on 2 cores")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        metavar="MODE",
        help="torch.compile the network in (b) and (c), in this mode (default: default)",
    )
    parser.add_argument("--default-only", action="store_true", help="(c) with the defaults only, at each batch size")
    parser.add_argument("--speedups-off", action="store_true", help="each (c) again with speedups.py switched off")
    parser.add_argument("--against", metavar="SRC", help="each (c) again from this checkout (its src/ on the path)")
    parser.add_argument("--no-plain", action="store_true", help="skip (b), measured elsewhere in the same session")
    parser.add_argument(
        "--fit-args",
        type=shlex.split,
        default=[],
        help="extra options for every (c) run, e.g. --trainer.precision bf16-mixed",
    )
    args = parser.parse_args()
    data_dir, epochs = str(Path(args.data_dir).resolve()), args.epochs
    compiled = ["--model.compile", "true", "--model.compile_mode", args.compile] if args.compile else []
    fit_args = args.fit_args + compiled
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, device {args.device}, {epochs} epochs, "
        f"median of {args.repeats} run(s) by training-loop time\n"
    )
    print(
        "| variant | wall s | CPU s | train-loop s | samples/s | ms/step | GFLOP/s | peak RSS MiB | test acc % "
        "| c/a and c/b (wall / loop) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    configs = HERE.parent / "configs"
    epochs_shown = []  # (row name, each epoch's seconds), printed under the table
    variants_of = {"": None}  # each (c) runs in these environments: as installed, and those asked for
    if args.speedups_off:
        variants_of[" [speedups off]"] = {**os.environ, "MNIST_LIGHTNING_SPEEDUPS": "none"}
    if args.against:
        src = str(Path(args.against, "src").resolve())
        variants_of[f" [{args.against}]"] = {**os.environ, "PYTHONPATH": src}
    for bs in args.batch_sizes:
        variants = {}
        if not args.no_tutorial and args.device == "cpu":
            variants["(a) tutorial"] = partial(baseline, "tutorial", data_dir, bs, epochs, args.device)
        if not args.no_plain:
            variants["(b) in-memory loop"] = partial(
                baseline, "in_memory", data_dir, bs, epochs, args.device, args.compile
            )
        shipped = not args.default_only and bs == args.batch_sizes[0]
        for tag, env in variants_of.items():
            fit = partial(lightning_fit, env=env)
            variants[f"(c) fit default{tag}"] = partial(fit, data_dir, bs, epochs, args.device, *fit_args)
            if not args.default_only:
                tutorial = ["--config", str(configs / "tutorial.yaml"), *fit_args]
                variants[f"(c) fit tutorial.yaml{tag}"] = partial(fit, data_dir, bs, epochs, args.device, *tutorial)
            if shipped:  # the commands as shipped, against the tutorial as written (the first batch size, 64)
                variants[f"default{tag}"] = partial(fit, data_dir, None, epochs, args.device, *fit_args)
                fast = ["--config", str(configs / "fast.yaml"), *fit_args]
                variants[f"fast.yaml{tag}"] = partial(fit, data_dir, None, epochs, args.device, *fast)
        if shipped and args.speedups_off:
            for name, setting in without_each(speedup_names()).items():
                env = {**os.environ, "MNIST_LIGHTNING_SPEEDUPS": setting}
                # As the default as shipped above, fit_args included, so that X is the one difference.
                variants[f"default [without {name}]"] = partial(
                    lightning_fit, data_dir, None, epochs, args.device, *fit_args, env=env
                )
        results = medians(variants, args.repeats)
        ref = {name[1]: results[name] for name in ("(a) tutorial", "(b) in-memory loop") if name in results}
        for name, result in results.items():
            label = f"{name}, batch {bs}" if name.startswith("(") else f"(c) fit {name}, as shipped"
            if name.startswith("(c)"):
                print(row(label, result, ref))
            elif name.startswith("("):
                print(row(label, result, {}))
            else:
                print(row(label, result, {k: v for k, v in ref.items() if k == "a"}))
            if "epoch_s" in result:  # (a) has none
                epochs_shown.append((label, result["epoch_s"]))
    # Whether a loop's excess is a slow first epoch (start-up) or the same in every epoch; (c)'s epochs
    # include their validation and checkpoint.
    print("\nseconds per epoch, the runs above:")
    for name, seconds in epochs_shown:
        print(f"  {name}: " + " ".join(f"{s:.3f}" for s in seconds))


if __name__ == "__main__":
    main()
