"""Test accuracy of the configs on real MNIST, over seeds: ``python benchmarks/accuracy.py DATA_DIR``.

Each run is a whole ``python -m mnist_lightning.fit`` process; its figures come from its metrics.json.
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from baselines import tutorial

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fit(data_dir: str, seed: int, *args: str) -> tuple[float, float, float | None]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        # --config must come first: later options override what it sets.
        cmd = [sys.executable, "-m", "mnist_lightning.fit", *args, "--data.data_dir", data_dir]
        subprocess.run([*cmd, "--seed_everything", str(seed)], cwd=tmp, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        metrics = json.loads(next(Path(tmp).glob("lightning_logs/version_*/metrics.json")).read_text())
    # val/acc_best: what a choice between recipes may look at; the test set is for reporting.
    return metrics["test/acc"], seconds, metrics.get("val/acc_best")


def report(name: str, runs: list[tuple]) -> None:
    accs, vals = [r[0] * 100 for r in runs], [r[2] * 100 for r in runs if len(r) > 2 and r[2] is not None]
    print(
        f"| {name} | {statistics.mean(accs):.2f} | {min(accs):.2f}-{max(accs):.2f} "
        f"| {f'{statistics.mean(vals):.2f}' if vals else ''} | {statistics.mean(r[1] for r in runs):.1f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", help="folder holding MNIST/raw/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--tutorial", action="store_true", help="also run the PyTorch MNIST tutorial's own loop (~20 s/seed here)"
    )
    parser.add_argument("--extra", nargs="*", default=[], help="NAME=ARGS: more fit variants, e.g. bs512='...'")
    parser.add_argument("--fit-args", type=shlex.split, default=[], help="options added to every fit")
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    print(f"seeds {args.seeds}\n")
    print("| run | test acc % (mean) | min-max | val acc_best % (mean) | seconds (whole process) |")
    print("|---|---|---|---|---|")
    more = args.fit_args
    report("fit, the defaults", [fit(data_dir, s, *more) for s in args.seeds])
    report(
        "fit, configs/tutorial.yaml",
        [fit(data_dir, s, "--config", str(CONFIGS / "tutorial.yaml"), *more) for s in args.seeds],
    )
    for extra in args.extra:
        name, _, options = extra.partition("=")
        report(f"fit, {name}", [fit(data_dir, s, *options.split(), *more) for s in args.seeds])
    if args.tutorial:
        report(
            "the PyTorch MNIST tutorial (plain PyTorch, train loop only)",
            [(r["test_acc"], r["train_s"]) for r in (tutorial(data_dir, seed=s) for s in args.seeds)],
        )


if __name__ == "__main__":
    main()
