"""Training speed on a quiet and on a busy machine: ``python benchmarks/busy.py DATA_DIR [--repeats 3]``.

Each variant runs as its own process, timed from launch to exit, once with the machine otherwise idle and
once beside one CPU-bound neighbour (``python3 -c "while True: pass"``, one core's worth), taking turns:
  fit           ``python -m mnist_lightning.fit`` as shipped (the thread policy of cli.threads)
  fit, N threads  the same with OMP_NUM_THREADS=N, N the cores this process may use: torch's own default
  tutorial      the six-step tutorial as written (benchmarks/baselines.py tutorial), torch's default threads
  plain loop    the lower bound, in-memory tensors (benchmarks/baselines.py in_memory), torch's default threads
Prints a markdown table of median seconds, quiet and busy, and their ratio.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def seconds(cmd: list[str], env: dict, busy: bool) -> float:
    """Wall seconds of cmd, with a CPU-bound neighbour running all the while if ``busy``."""
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        took = time.perf_counter() - start
    finally:
        if neighbour:
            neighbour.kill()
            neighbour.wait()
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="folder holding MNIST/raw/")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; each variant's median is shown")
    parser.add_argument("--only", nargs="+", help="run only these variants (by name)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"busy-{os.getpid()}"
    fit = [sys.executable, "-m", "mnist_lightning.fit", "--data.data_dir", args.data_dir]
    fit += ["--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
    baseline = [sys.executable, str(HERE / "baselines.py")]
    variants = {
        "fit": (fit, base),
        f"fit, {cores} threads": (fit, {**base, "OMP_NUM_THREADS": str(cores)}),
        "tutorial": ([*baseline, "tutorial", args.data_dir], base),
        "plain loop": ([*baseline, "in_memory", args.data_dir], base),
    }
    if args.only:
        variants = {name: v for name, v in variants.items() if name in args.only}
    times = {(name, busy): [] for name in variants for busy in (False, True)}
    for round_ in range(args.repeats):
        for name, (cmd, env) in variants.items():
            for busy in (False, True):
                times[name, busy].append(seconds(cmd, env, busy))
                print(f"round {round_ + 1} {name} {'busy' if busy else 'quiet'}: {times[name, busy][-1]:.1f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
    print(f"{cores} cores; medians of {args.repeats} round(s), seconds from launch to exit\n")
    print("| variant | quiet | one busy neighbour | busy / quiet |")
    print("|---|---:|---:|---:|")
    for name in variants:
        quiet, busy = statistics.median(times[name, False]), statistics.median(times[name, True])
        print(f"| {name} | {quiet:.1f} | {busy:.1f} | {busy / quiet:.2f}x |")


if __name__ == "__main__":
    main()
