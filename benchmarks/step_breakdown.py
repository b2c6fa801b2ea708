"""Where a training step's time goes, (b) against (c): ``python benchmarks/step_breakdown.py DATA_DIR``.

Timers wrap the network's forward, ``Tensor.backward`` and the fused Adam kernel, in-process, so the
arithmetic can be told apart from everything around it (a sampling profiler misattributes it here).
(c) runs without validation, so that both sides do the same work per step. One run per side and call.
On CUDA the timers measure the host issuing the work, which is what sets a small network's pace there.
"""

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
import torch.optim.adam as adam  # the module; torch.optim itself hides the name
from torch import nn

HERE = Path(__file__).resolve().parent
seconds: dict[str, float] = collections.defaultdict(float)


def timed(name: str, fn, training_only: bool = False):
    def wrapper(*args, **kwargs):
        if training_only and not torch.is_grad_enabled():  # an evaluation forward, not a training step's
            return fn(*args, **kwargs)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="folder holding MNIST/raw/")
    parser.add_argument("which", choices=["b", "c"], help="(b) the plain loop or (c) the fit, seed.yaml")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="seed.yaml's")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[], help="extra options for (c)")
    args = parser.parse_args()
    nn.Sequential.forward = timed("forward", nn.Sequential.forward, training_only=True)  # the MLP, in both
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    adam._fused_adam = timed("fused Adam", adam._fused_adam)
    if args.which == "b":
        sys.path.insert(0, str(HERE))
        from baselines import in_memory

        result = in_memory(args.data_dir, epochs=args.epochs, batch_size=args.batch_size, device=args.device)
        steps, loop = result["steps"], result["train_s"]
    else:
        from mnist_lightning.fit import cli_main

        config = str(HERE.parent / "configs" / "seed.yaml")
        # --fit-args first, so that a --config among them cannot undo this script's own settings.
        options = ["--trainer.max_epochs", str(args.epochs), "--trainer.limit_val_batches", "0"]
        options += ["--data.batch_size", str(args.batch_size)]
        options += ["--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu"]
        metrics = cli_main(["--config", config, *args.fit_args, "--data.data_dir", args.data_dir, *options])
        steps, loop = metrics["global_step"], sum(metrics["epoch_seconds"])
    timed_ms = {name: 1000 * s / steps for name, s in seconds.items()}
    rest = 1000 * loop / steps - sum(timed_ms.values())
    cells = "  ".join(f"{name} {ms:.3f}" for name, ms in timed_ms.items())
    print(
        f"({args.which}) ms/step: {cells}  everything else {rest:.3f}  step {1000 * loop / steps:.3f}  ({steps} steps)"
    )


if __name__ == "__main__":
    main()
