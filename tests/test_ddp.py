"""DDP on CPU processes (gloo): the same properties a multi-GPU or multi-node run relies on."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from conftest import FAST, run_module
from mnist_lightning.calibration import fit_temperature
from mnist_lightning.data import MNISTDataModule
from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.fit import cli_main
from mnist_lightning.model import MNISTClassifier
from mnist_lightning.training.callbacks import ProcessGroupTeardown

pytestmark = pytest.mark.slow

# One epoch at a low learning rate, so accuracy lands well between chance and 100% and a
# miscounted test image would show.
HALF_TRAINED = [*FAST, "--trainer.max_epochs", "1", "--model.lr", "3e-4", "--model.scheduler", "none"]


def single_process_test_count(ckpt: Path, data_dir: Path) -> tuple[int, int]:
    """Correct predictions of a checkpoint on the full test set, in this process, without Lightning."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = MNISTClassifier(**{k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")})
    model.load_state_dict(checkpoint["state_dict"])
    data = MNISTDataModule(data_dir=str(data_dir), val_size=100)
    data.setup("test")
    with torch.no_grad():
        predictions = model(data.test_set.images).argmax(1)
    return int((predictions == data.test_set.labels).sum()), len(data.test_set)


def check_run(root: Path, data_dir: Path, out: str) -> dict:
    """One version folder, written by one process; metrics equal a single-process evaluation."""
    (version,) = (root / "lightning_logs").iterdir()
    writers = {p.name.split(".")[4] for p in version.glob("events.out.tfevents.*")}  # the writer's pid
    assert len(writers) == 1
    metrics = json.loads((version / "metrics.json").read_text())
    assert out.count("epoch 1/1") == 1  # printed by rank zero only
    correct, total = single_process_test_count(Path(metrics["best_model_path"]), data_dir)
    assert 0.2 < correct / total < 0.99  # half trained, so the comparison below means something
    assert round(metrics["test/acc"] * total) == correct
    # The temperature was fitted on every validation image once, gathered from both ranks' shards.
    net, _, settings = load_checkpoint(metrics["best_model_path"])
    data = MNISTDataModule(data_dir=str(data_dir), val_size=100)
    data.setup("fit")
    with torch.inference_mode():
        temperature = fit_temperature(net(data.val_set.images), data.val_set.labels)
    assert settings["temperature"] == pytest.approx(temperature, rel=1e-4)
    return metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(data_dir, tmp_path):
    args = ["--data.data_dir", str(data_dir), *HALF_TRAINED, "--trainer.accelerator", "cpu"]
    (tmp_path / "one").mkdir()
    run_module("mnist_lightning.fit", *args, cwd=tmp_path / "one")
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    proc = run_module("mnist_lightning.fit", *args, "--trainer.devices", "2", "--trainer.strategy", "ddp", cwd=ddp_dir)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr  # the second process really joined
    metrics = check_run(ddp_dir, data_dir, proc.stdout)
    one = json.loads(next((tmp_path / "one").glob("lightning_logs/version_0/metrics.json")).read_text())
    # A global batch split over two ranks takes the same number of optimizer steps as one process.
    assert metrics["global_step"] == one["global_step"]
    assert sorted(p.name for p in Path(metrics["best_model_path"]).parent.iterdir())[-1] == "last.ckpt"


def two_nodes(data_dir, cwd, launch: list[str]) -> list[tuple[str, str]]:
    """Two torchrun "nodes" of one process each on this host, started with ``launch`` (one list per node);
    returns each one's stdout and stderr, checking that both succeeded."""
    fit = ["-m", "mnist_lightning.fit", "--data.data_dir", str(data_dir), *HALF_TRAINED, "--trainer.accelerator"]
    fit += ["cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.strategy", "ddp"]
    run = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    nodes = [
        subprocess.Popen([*run, *node, *fit], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in launch
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out + err
    return outputs


def test_two_nodes_under_torchrun(data_dir, tmp_path):
    port = free_port()
    static = ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    outputs = two_nodes(data_dir, tmp_path, [["--node-rank", str(rank), *static] for rank in (0, 1)])
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1][1]
    check_run(tmp_path, data_dir, outputs[0][0] + outputs[1][0])


def test_two_nodes_under_torchrun_with_c10d_rendezvous(data_dir, tmp_path):
    # What TorchX and Kubeflow start: no node ranks, the rendezvous hands them out; either node may host it.
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "mnist-42"]
    outputs = two_nodes(data_dir, tmp_path, [rendezvous, rendezvous])
    assert sum("GLOBAL_RANK: 1, MEMBER: 2/2" in err for _, err in outputs) == 1
    check_run(tmp_path, data_dir, outputs[0][0] + outputs[1][0])


@pytest.mark.parametrize(
    "options", [["--trainer.strategy", "ddp_spawn", "--trainer.devices", "2"], ["--trainer.precision", "bf16-mixed"]]
)
def test_smoke(data_dir, tmp_path, options):
    run_module(
        "mnist_lightning.fit",
        "--data.data_dir",
        str(data_dir),
        *HALF_TRAINED,
        "--trainer.accelerator",
        "cpu",
        *options,
        cwd=tmp_path,
    )
    metrics = json.loads(next(tmp_path.glob("lightning_logs/version_0/metrics.json")).read_text())
    assert metrics["test/acc"] > 0.2


def test_the_process_group_is_destroyed_at_exit(data_dir, tmp_path, monkeypatch):
    """gloo aborts an exiting process now and then when its group is left to the interpreter's shutdown
    (ProcessGroupTeardown's docstring); every process a fit sets up must destroy it at exit, once."""
    monkeypatch.chdir(tmp_path)
    callbacks = []

    class Look(Callback):
        def on_fit_end(self, trainer, model):
            callbacks.extend(trainer.callbacks)

    cli_main(["--data.data_dir", str(data_dir), *FAST, "--trainer.max_epochs", "1"], callbacks=[Look()])
    assert sum(isinstance(c, ProcessGroupTeardown) for c in callbacks) == 1
    script = f"""
import atexit, signal, torch
from mnist_lightning.training.callbacks import ProcessGroupTeardown
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a shell, whatever pytest was started with
torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
destroy, calls = torch.distributed.destroy_process_group, []
# Ctrl-C is ignored while the group is destroyed, and handled as before afterwards.
torch.distributed.destroy_process_group = lambda: calls.append(signal.getsignal(signal.SIGINT).name) or destroy()
# atexit runs last-registered first, so this reports after the teardown has run
atexit.register(lambda: print("initialized at exit:", torch.distributed.is_initialized(), "destroyed", calls,
                              "then", signal.getsignal(signal.SIGINT).__name__))
for stage in ("fit", "test"):  # both stages set up; the group is destroyed once, without an error
    ProcessGroupTeardown().setup(None, None, stage)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "initialized at exit: False destroyed ['SIG_IGN'] then default_int_handler"


SHARDS = """
import json, sys
from lightning.pytorch import Callback
from mnist_lightning.fit import cli_main

class Shard(Callback):  # what this rank trains on in each epoch: the indices its sampler yields
    def on_train_epoch_start(self, trainer, model):
        order = trainer.train_dataloader.sampler
        with open(f"shard-{trainer.global_rank}-{trainer.current_epoch}.json", "w") as f:
            json.dump(sorted(i for batch in order for i in batch.tolist()), f)

cli_main(sys.argv[1:], callbacks=[Shard()])
"""


def test_ddp_ranks_train_on_disjoint_shards_without_a_seed(data_dir, tmp_path):
    """With --seed_everything false every process has its own random seed; the shuffle must still agree."""
    (tmp_path / "shards.py").write_text(SHARDS)
    args = ["--data.data_dir", str(data_dir), *HALF_TRAINED, "--trainer.accelerator", "cpu", "--data.batch_size", "64"]
    args += ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--seed_everything", "false"]
    proc = subprocess.run(
        [sys.executable, "shards.py", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    shards = [json.loads((tmp_path / f"shard-{rank}-0.json").read_text()) for rank in (0, 1)]
    train_size = 1000 - 100
    assert len(shards[0]) == len(shards[1]) == train_size // 2
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(train_size))
