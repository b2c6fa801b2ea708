"""Inference speed: ``python benchmarks/inference.py CKPT DATA_DIR [--threads N]``.

(a) predict on a folder of PNGs written from the real test set: reading, preprocessing, the model and
    one printed line per image, timed in-process and as a whole ``python -m mnist_lightning.predict``;
(b) predict on one image as a whole process, beside ``import torch`` alone (``--against SRC``: and predict
    from another checkout, e.g. an older commit's worktree);
(c) batch inference of the exported graph (raw pixels in, logits out) in PyTorch, ONNX Runtime and
    TorchScript, at batch 1 and 1024.
"""

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch
from PIL import Image

from mnist_lightning import predict
from mnist_lightning.export import RawPixels, to_onnx, to_torchscript
from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.files.idx import load_split


def median_call(run, batches: list, passes: int = 3) -> float:
    """Median seconds per call over a few passes, after a warm-up pass that allocates and picks kernels.

    Not the mean: on a shared CPU, a call whose threads wait for a core held by another process takes ~30x longer.
    """
    times = []
    with torch.inference_mode():
        for _ in range(passes + 1):
            for batch in batches:
                start = time.perf_counter()
                run(batch)
                times.append(time.perf_counter() - start)
    return statistics.median(times[len(batches) :])


def predict_throughput(ckpt: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for i, image in enumerate(images[:, 0].numpy()):
            Image.fromarray(image).save(f"{tmp}/{i:05d}_{labels[i]}.png")
        args = ["--ckpt_path", ckpt, tmp, "--output", f"{tmp}/preds.json"]
        with contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            predictions = predict.cli_main(args)
            seconds = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mnist_lightning.predict", *args], check=True, capture_output=True)
        command = time.perf_counter() - start
    correct = sum(p["digit"] == int(Path(p["path"]).stem.split("_")[1]) for p in predictions)
    print(
        f"predict, {len(images):,} PNGs: {len(images) / seconds:,.0f} images/s in-process ({seconds:.2f} s), "
        f"{len(images) / command:,.0f} images/s as a command ({command:.2f} s with start-up); "
        f"accuracy {correct / len(images):.4f}"
    )


def start_up(ckpt: str, image: torch.Tensor, against: str | None, runs: int = 5) -> None:
    """predict on one image as a whole process, beside importing torch alone: what a user waits for."""
    commands = {"python -c 'import torch'": ([sys.executable, "-c", "import torch"], None)}
    with tempfile.TemporaryDirectory() as tmp:
        Image.fromarray(image.numpy()).save(f"{tmp}/one.png")
        predict_one = [sys.executable, "-m", "mnist_lightning.predict", "--ckpt_path", ckpt, f"{tmp}/one.png"]
        commands["predict, one image"] = (predict_one, None)
        if against:
            env = {**os.environ, "PYTHONPATH": str(Path(against, "src").resolve())}
            commands[f"predict, one image [{against}]"] = (predict_one, env)
        seconds = {name: [] for name in commands}
        for _ in range(runs):  # taking turns, so that a slow spell hits them alike
            for name, (cmd, env) in commands.items():
                start = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True, env=env)
                seconds[name].append(time.perf_counter() - start)
    print(f"\n| whole process | median of {runs} s | min-max s |\n|---|---:|---:|")
    for name, times in seconds.items():
        print(f"| {name} | {statistics.median(times):.2f} | {min(times):.2f}-{max(times):.2f} |")


def batch_throughput(ckpt: str, pixels: torch.Tensor, calls: int = 2000) -> None:
    net, (mean, std), _ = load_checkpoint(ckpt)
    module = RawPixels(net, mean, std).eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads for every runtime
    session = onnxruntime.InferenceSession(to_onnx(module, pixels[:2], "pixels"), options, ["CPUExecutionProvider"])
    scripted = torch.jit.load(io.BytesIO(to_torchscript(module)))
    runtimes = {
        "PyTorch (eager)": module,
        "ONNX Runtime": lambda x: session.run(None, {"pixels": x})[0],
        "TorchScript": scripted,
    }
    print(f"\n| runtime | batch | images/s | ms per batch (median) |  (torch threads: {torch.get_num_threads()})")
    print("|---|---:|---:|---:|")
    for name, run in runtimes.items():
        large = min(1024, len(pixels))  # a small test set (the tests' synthetic one) gives one smaller batch
        for batch, count in ((1, calls), (large, len(pixels) // large * large)):
            batches = [pixels[i : i + batch] for i in range(0, count, batch)]
            if name == "ONNX Runtime":
                batches = [b.numpy() for b in batches]
            seconds = median_call(run, batches)
            print(f"| {name} | {batch} | {batch / seconds:,.0f} | {1000 * seconds:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="checkpoint written by mnist_lightning.fit")
    parser.add_argument("data_dir", help="folder holding MNIST/raw/")
    parser.add_argument("--images", type=int, default=10000, help="how many test images to write as PNGs")
    parser.add_argument("--threads", type=int, help="CPU threads for all runtimes (default: PyTorch's choice)")
    parser.add_argument("--against", metavar="SRC", help="also time predict's start-up from this checkout's src/")
    parser.add_argument("--runs", type=int, default=5, help="whole-process runs of each start-up command")
    parser.add_argument("--calls", type=int, default=2000, help="calls at batch 1 for each runtime")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels = load_split(Path(args.data_dir) / "MNIST" / "raw", "test")
    predict_throughput(args.ckpt, images[: args.images], labels[: args.images])
    start_up(args.ckpt, images[0, 0], args.against, args.runs)
    batch_throughput(args.ckpt, images.float(), args.calls)


if __name__ == "__main__":
    main()
