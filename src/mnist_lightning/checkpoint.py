"""Load a checkpoint written by fit without running any code from it, or say clearly why not."""

import os
import warnings
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mnist_lightning.errors import UserError
from mnist_lightning.model import MNISTClassifier

WHAT_TO_DO = "pass a .ckpt that mnist_lightning.fit wrote (lightning_logs/version_N/checkpoints/)"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, syncs it, then renames it into place.

    A kill at any moment leaves the old file or the new one, never a torn one. Lightning's own
    writer stages in the system temp folder and moves from there, which on another file system is a
    plain copy. A full disk keeps the old file and stops the run with one line.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
                stale.unlink(missing_ok=True)
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            raise UserError(
                f"could not write checkpoint {path} ({err.strerror}); any earlier one is kept. "
                "Free some space or pass --trainer.default_root_dir DIR"
            ) from None


def _read(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; {WHAT_TO_DO}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file; {WHAT_TO_DO}")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty; {WHAT_TO_DO}")
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


def load_checkpoint(
    path: str | Path, model: MNISTClassifier | None = None
) -> tuple[MNISTClassifier, tuple[float, float], dict]:
    """Return the classifier (eval mode, on the CPU), its (mean, std) and the datamodule's hparams.

    The weights go into ``model`` if given (fit checks a checkpoint before resuming from it this
    way), else into a network built with the checkpoint's own hidden sizes.
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
    # With fit's label smoothing, evaluate's loss is the test/loss that fit reported.
    if model is None:
        smoothing = hparams.get("label_smoothing", 0.0)
        model = MNISTClassifier(hparams["hidden1"], hparams["hidden2"], label_smoothing=smoothing)
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} holds another network (missing {', '.join(missing) or 'nothing'}; "
            f"unexpected {', '.join(unexpected) or 'nothing'}); {WHAT_TO_DO}"
        )
    differ = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if differ:
        raise UserError(
            f"checkpoint {path} was trained with other layer sizes: {'; '.join(differ)}; "
            f"set --model.hidden1/--model.hidden2 to match it, or {WHAT_TO_DO}"
        )
    model.load_state_dict(state)
    # Not the metrics' state: an epoch-less best accuracy is legitimately -inf.
    bad = [f"net.{k}" for k, v in model.net.state_dict().items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"checkpoint {path} holds NaN or infinite weights in {', '.join(bad)}; use an earlier one")
    return model.eval(), (float(data["mean"]), float(data["std"])), {k: v for k, v in data.items() if k[0] != "_"}
