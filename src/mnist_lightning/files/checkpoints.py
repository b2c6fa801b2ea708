"""Which checkpoint ``--ckpt_path`` names, and loading one written by fit without running any code from it,
or saying clearly why not."""

import json
import math
import sys
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from mnist_lightning.errors import UserError
from mnist_lightning.net import MLP

WHAT_TO_DO = "pass a .ckpt that mnist_lightning.fit wrote (lightning_logs/version_N/checkpoints/)"
# Besides the network, a checkpoint's state_dict holds the LightningModule's persistent metric states.
NOT_THE_NETWORK = ("val_acc_best.",)


def _read(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; {WHAT_TO_DO}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file; {WHAT_TO_DO}")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty; {WHAT_TO_DO}")
    _check_archive(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4", on foreign pickles
            # weights_only: the unpickler builds only tensors and plain containers, so a hostile
            # checkpoint cannot run code while loading; fit's checkpoints need nothing more.
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as err:
        raise UserError(f"checkpoint {path} cannot be read ({err.strerror}); check its permissions") from err
    except Exception as err:  # junk bytes fail with whatever they trigger: KeyError, RuntimeError, ...
        # A pickle that imports a callable (os.system, eval, ...) is named by the refusal's GLOBAL line.
        culprit = next((line.strip().rstrip(".") for line in str(err).splitlines() if "GLOBAL" in line), None)
        if culprit:
            raise UserError(
                f"checkpoint {path} was refused as unsafe: loading it would run code ({culprit}); "
                f"do not use it, {WHAT_TO_DO}"
            ) from err
        raise UserError(f"checkpoint {path} is truncated, corrupt or not a PyTorch checkpoint; {WHAT_TO_DO}") from err
    if not isinstance(checkpoint, dict):
        raise UserError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint; {WHAT_TO_DO}")
    return checkpoint


def _check_archive(path: Path) -> None:
    """torch.save writes a zip: check each member's CRC (milliseconds) before trusting its bytes, and
    refuse a zip bomb before anything is inflated. Not a zip at all is torch.load's to refuse."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        return
    with archive:
        # torch.save stores its members uncompressed, and float weights barely compress: a member
        # declaring far more bytes than the whole file is a bomb, whatever it holds.
        declared, size = sum(info.file_size for info in archive.infolist()), path.stat().st_size
        if declared > 100 * size + 2**27:
            raise UserError(
                f"checkpoint {path} was refused: its {size:,} bytes declare {declared:,} bytes uncompressed "
                f"(a zip bomb); do not use it, {WHAT_TO_DO}"
            )
        try:
            bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
            raise UserError(f"checkpoint {path} is corrupt ({err}); use an earlier one or train again") from None
    if bad:
        raise UserError(
            f"checkpoint {path} is corrupt: {bad} fails its CRC check (bit rot or a bad copy); "
            "use an earlier one or train again"
        )


def resolve_checkpoint(ckpt_path: str, root: Path = Path("."), logger=None) -> Path:
    """What ``--ckpt_path`` means in every command: ``last`` is the newest run's last.ckpt, ``best`` its best
    checkpoint, anything else a path. The runs are ``ROOT/lightning_logs/version_*`` (with ``logger`` False,
    Lightning's ``ROOT/checkpoints``); the newest is the one whose checkpoints were written last."""
    if ckpt_path not in ("last", "best"):
        return Path(ckpt_path)
    if logger in (None, True):  # the default logger: lightning_logs/version_N/checkpoints/
        folders = list(root.glob("lightning_logs/version_*/checkpoints"))
    elif logger is False:  # no logger: Lightning writes the checkpoints to ROOT/checkpoints/
        folders = [root / "checkpoints"]
    else:
        raise UserError(
            f"--ckpt_path {ckpt_path} finds the runs of the default logger only; pass the checkpoint's path"
        )
    written = [
        (max(p.stat().st_mtime for p in ckpts), folder) for folder in folders if (ckpts := list(folder.glob("*.ckpt")))
    ]
    if not written:
        raise UserError(f"--ckpt_path {ckpt_path}: no run in {root}/ has a checkpoint; pass a .ckpt path")
    folder = max(written)[1]
    if ckpt_path == "last":
        if not (folder / "last.ckpt").is_file():
            raise UserError(f"--ckpt_path last: the newest run, {folder.parent}, has no last.ckpt; pass a .ckpt path")
        return folder / "last.ckpt"
    try:  # a finished run names its best; before it ends, the best is the newest other checkpoint
        best = Path(json.loads((folder.parent / "metrics.json").read_text())["best_model_path"])
    except (OSError, ValueError, KeyError, TypeError):
        best = None
    if best is None or not best.is_file():
        others = [p for p in folder.glob("*.ckpt") if p.name != "last.ckpt" and not p.name.startswith("hpc_")]
        if not others:
            raise UserError(
                f"--ckpt_path best: the newest run, {folder.parent}, has no best checkpoint yet; pass a path"
            )
        best = max(others, key=lambda p: p.stat().st_mtime)
    return best


def load_checkpoint(
    path: str | Path, like: nn.Module | None = None, quiet: bool = False
) -> tuple[MLP, tuple[float, float], dict]:
    """Return the network (eval mode, on the CPU), its (mean, std) and the settings it was trained with
    (``{"data": ..., "model": ..., "temperature": T}``, the datamodule's and the module's hyperparameters,
    and the temperature fitted on the validation images: softmax(net(x) / T) are calibrated probabilities).

    A checkpoint older than calibration has no temperature: T is 1, and unless ``quiet`` (fit, serve's
    workers) a note on stderr says that its probabilities are uncalibrated.

    Only torch is needed, not Lightning, so the commands that use a checkpoint start fast. The network
    is built with the checkpoint's own hidden sizes; given ``like`` (fit, before resuming), its layer
    sizes must match that network's.
    """
    path = Path(path)
    checkpoint = _read(path)
    state, hparams = checkpoint.get("state_dict"), checkpoint.get("hyper_parameters")
    data = checkpoint.get("datamodule_hyper_parameters")
    if not (
        isinstance(state, dict)
        and all(isinstance(v, torch.Tensor) for v in state.values())
        and isinstance(hparams, dict)
        and all(isinstance(hparams.get(k), int) and hparams[k] > 0 for k in ("hidden1", "hidden2"))
        and isinstance(data, dict)
        and all(isinstance(data.get(k), int | float) for k in ("mean", "std"))
    ):
        raise UserError(
            f"checkpoint {path} is not from mnist_lightning: it lacks the state_dict, the hidden1/hidden2 "
            f"hyperparameters or the data mean/std; {WHAT_TO_DO}"
        )
    mean, std = float(data["mean"]), float(data["std"])
    temperature = checkpoint.get("temperature", 1.0)
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise UserError(f"checkpoint {path} holds temperature {temperature!r}, not a positive number; {WHAT_TO_DO}")
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise UserError(
            f"checkpoint {path} normalises with mean {mean} and std {std}, which would turn every image into "
            "NaN or infinity; use another checkpoint"
        )
    if like is None:
        with torch.device("meta"):  # shapes without memory: a hostile checkpoint may claim any hidden size
            like = MLP(hparams["hidden1"], hparams["hidden2"])
    expected = {f"net.{k}": v for k, v in like.state_dict().items()}
    weights = {k: v for k, v in state.items() if not k.startswith(NOT_THE_NETWORK)}
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} holds another network (missing {', '.join(missing) or 'nothing'}; "
            f"unexpected {', '.join(unexpected) or 'nothing'}); {WHAT_TO_DO}"
        )
    differ = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if weights[k].shape != v.shape
    ]
    if differ:
        raise UserError(
            f"checkpoint {path} was trained with other layer sizes: {'; '.join(differ)}; "
            f"set --model.hidden1/--model.hidden2 to match it, or {WHAT_TO_DO}"
        )
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"checkpoint {path} holds NaN or infinite weights in {', '.join(bad)}; use an earlier one")
    net = MLP(hparams["hidden1"], hparams["hidden2"])  # no bigger than the weights already read
    net.load_state_dict({k.removeprefix("net."): v for k, v in weights.items()})
    # LightningCLI's bookkeeping (keys starting with _) is no hyperparameter.
    settings = {
        group: {k: v for k, v in hp.items() if k[0] != "_"} for group, hp in (("data", data), ("model", hparams))
    }
    settings["temperature"] = float(temperature)
    if "temperature" not in checkpoint and not quiet:
        print(
            f"note: {path} has no temperature (older than calibration): probabilities are uncalibrated", file=sys.stderr
        )
    return net.eval(), (mean, std), settings
