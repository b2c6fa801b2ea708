"""The temperature: fitted on the validation images alone, carried by every checkpoint, applied by every command."""

import math

import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassCalibrationError

from mnist_lightning.calibration import calibration_error, fit_temperature, nll, reliability
from mnist_lightning.data import MNISTDataModule
from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.files.idx import load_split
from mnist_lightning.predict import cli_main as predict_main


def random_logits(n: int = 3000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Overconfident logits: right two times in three, with large margins either way."""
    g = torch.Generator().manual_seed(seed)
    logits, labels = 4 * torch.randn(n, 10, generator=g), torch.randint(0, 10, (n,), generator=g)
    labels[: 2 * n // 3] = logits[: 2 * n // 3].argmax(1)
    return logits, labels


def split_logits(ckpt, data_dir, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's logits on fit's validation split (the session fit's --data.val_size 100) or the test set."""
    net, _, _ = load_checkpoint(ckpt)
    data = MNISTDataModule(data_dir=str(data_dir), val_size=100)
    data.setup("fit" if split == "val" else "test")
    images = data.val_set if split == "val" else data.test_set
    with torch.inference_mode():
        return net(images.images), images.labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_torchmetrics(seed):
    logits, labels = random_logits(seed=seed)
    for temperature in (0.5, 1.0, 3.0):
        probabilities = (logits / temperature).softmax(1)
        expected = MulticlassCalibrationError(10, n_bins=15, norm="l1")(probabilities, labels)
        assert calibration_error(reliability(probabilities, labels)) == pytest.approx(float(expected), abs=1e-6)


def test_ece_is_zero_when_confidence_is_accuracy():
    # Every answer at confidence 0.75, three in four right: calibrated exactly.
    probabilities = torch.full((8, 10), 0.25 / 9)
    probabilities[:, 0] = 0.75
    labels = torch.tensor([0, 0, 0, 1, 0, 0, 0, 2])
    assert calibration_error(reliability(probabilities, labels)) == pytest.approx(0, abs=1e-12)
    assert calibration_error(reliability(probabilities, torch.zeros(8, dtype=torch.long))) == pytest.approx(0.25)


def test_the_fitted_temperature_minimises_the_nll():
    logits, labels = random_logits()
    temperature = fit_temperature(logits, labels)
    grid = torch.linspace(math.log(0.1), math.log(10), 801).exp().tolist()
    best = min(grid, key=lambda t: nll(logits, labels, t))
    assert temperature == pytest.approx(best, rel=0.01) and temperature > 1  # overconfident: T above 1
    assert nll(logits, labels, temperature) <= min(nll(logits, labels, t) for t in grid) + 1e-9
    assert fit_temperature(logits, labels) == temperature  # deterministic
    assert fit_temperature(logits[:0], labels[:0]) == 1.0  # nothing to fit on


def test_every_checkpoint_carries_the_temperature_fitted_on_its_validation_images(fit_result, trained_ckpt, data_dir):
    saved = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    logits, labels = split_logits(trained_ckpt, data_dir, "val")
    # The same T from the validation split's logits by hand, to float32 rounding of the logits.
    assert saved["temperature"] == pytest.approx(fit_temperature(logits, labels), rel=1e-4)
    test_logits, test_labels = split_logits(trained_ckpt, data_dir, "test")
    assert saved["temperature"] != pytest.approx(fit_temperature(test_logits, test_labels), rel=1e-3)
    # Calibration lowers the validation NLL, compared with T = 1.
    assert nll(logits, labels, saved["temperature"]) < nll(logits, labels) - 1e-3
    last = torch.load(trained_ckpt.with_name("last.ckpt"), map_location="cpu", weights_only=True)
    assert 1e-3 < last["temperature"] < 1e3 and load_checkpoint(trained_ckpt)[2]["temperature"] == saved["temperature"]


def test_an_old_checkpoint_loads_with_temperature_1_and_a_note(trained_ckpt, tmp_path, capsys):
    checkpoint = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    del checkpoint["temperature"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    _, _, settings = load_checkpoint(tmp_path / "old.ckpt")
    assert settings["temperature"] == 1.0
    note = (
        f"note: {tmp_path / 'old.ckpt'} has no temperature (older than calibration): probabilities are uncalibrated\n"
    )
    assert capsys.readouterr().err == note
    load_checkpoint(tmp_path / "old.ckpt", quiet=True)  # fit resuming, serve's workers: no note
    assert capsys.readouterr().err == ""


def test_predict_with_an_old_checkpoint_says_so_once_and_reports_uncalibrated_probabilities(
    trained_ckpt, data_dir, tmp_path, capsys
):
    checkpoint = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    del checkpoint["temperature"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    images, _ = load_split(data_dir / "MNIST" / "raw", "test")
    for i, image in enumerate(images[:5, 0].numpy()):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    predictions = predict_main(
        ["--ckpt_path", str(tmp_path / "old.ckpt"), *(str(tmp_path / f"{i}.png") for i in range(5))]
    )
    assert capsys.readouterr().err.count("has no temperature (older than calibration)") == 1
    # T = 1: the probabilities are the plain softmax of the logits predict reports beside them.
    for p in predictions:
        assert p["probability"] == pytest.approx(max(torch.tensor(p["logits"]).softmax(0).tolist()), abs=1e-6)
