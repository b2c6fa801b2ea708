import json
import shutil
from pathlib import Path

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from conftest import TEST_SIZE
from mnist_lightning.errors import run_main
from mnist_lightning.evaluate import cli_main
from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.files.idx import load_split
from mnist_lightning.net import normalise


def test_evaluate_reports_what_fit_reported_for_the_same_checkpoint(fit_result, trained_ckpt, tmp_path, capsys):
    result = cli_main(["--ckpt_path", str(trained_ckpt), "--output", str(tmp_path / "eval.json")])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    # The tiny model misreads some digits, so equal accuracies mean the same images were read the same way.
    assert 0.5 < saved["accuracy"] < 1 and saved["accuracy"] == pytest.approx(fit_result["test/acc"], abs=1e-6)
    assert saved["loss"] == pytest.approx(fit_result["test/loss"], rel=1e-5)

    matrix = saved["confusion_matrix"]
    assert sum(map(sum, matrix)) == saved["images"] == 301
    for c, row in enumerate(saved["per_class"]):
        column = [matrix[t][c] for t in range(10)]
        assert row["images"] == sum(matrix[c]) and row["correct"] == matrix[c][c]
        assert row["recall"] == row["accuracy"] == pytest.approx(matrix[c][c] / sum(matrix[c]))
        assert row["precision"] == (matrix[c][c] / sum(column) if sum(column) else None)

    # Calibration with the checkpoint's temperature, the ECE as torchmetrics computes it.
    figures, (net, (mean, std), settings) = saved["calibration"], load_checkpoint(trained_ckpt)
    images, labels = load_split(Path(saved["data"]["data_dir"]) / "MNIST" / "raw", "test")
    with torch.inference_mode():
        logits = net(normalise(images, mean, std))
    assert figures["temperature"] == settings["temperature"] and figures["accuracy"] == saved["accuracy"]
    for name, t in (("uncalibrated", 1.0), ("calibrated", settings["temperature"])):
        ece = MulticlassCalibrationError(10, n_bins=15, norm="l1")((logits / t).softmax(1), labels)
        assert figures[name]["ece"] == pytest.approx(float(ece), abs=1e-5)
    assert figures["calibrated"]["nll"] < figures["uncalibrated"]["nll"]

    out = capsys.readouterr().out
    assert f"accuracy    {saved['accuracy']:.4f}" in out and "confusion matrix" in out
    assert f"ECE, 15 bins              {figures['uncalibrated']['ece']:>15.4f}" in out
    assert "true\\pred      0     1     2" in out
    table_row = "        3 " + "".join(f"{n:>6}" for n in matrix[3])
    assert table_row in out.splitlines()


def test_data_options_default_to_the_checkpoints_and_can_be_overridden(fit_result, trained_ckpt, tmp_path, capsys):
    ckpt = shutil.copy(trained_ckpt, tmp_path / "model.ckpt")
    default = cli_main(["--ckpt_path", str(ckpt), "--data.eval_batch_size", "7"])
    # No --data.data_dir: the checkpoint's; the JSON lands beside the checkpoint.
    assert default["data"]["data_dir"] == fit_result["config"]["data"]["data_dir"]
    assert default["data"]["eval_batch_size"] == 7 and default["data"]["mean"] == 0.1307
    assert json.loads((tmp_path / "model.eval.json").read_text())["accuracy"] == default["accuracy"]
    # Batches of 7 instead of fit's 1000: the same figures, as the epoch metrics are sums.
    assert default["accuracy"] == pytest.approx(fit_result["test/acc"], abs=1e-6)
    assert default["loss"] == pytest.approx(fit_result["test/loss"], rel=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.eval_batch_size", "0"], "eval_batch_size must be positive, got 0"),
        # The training batch has nothing to do here, so it is refused rather than silently ignored.
        (["--data.batch_size", "7"], "unrecognized arguments: --data.batch_size 7 (see --help)"),
    ],
)
def test_bad_data_options_exit_2_with_one_line(trained_ckpt, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        run_main(cli_main, ["--ckpt_path", str(trained_ckpt), *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_the_test_files_alone_are_enough(data_dir, trained_ckpt, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(data_dir / "MNIST" / "raw" / name, raw / name)
    out = str(tmp_path / "e.json")
    result = cli_main(["--ckpt_path", str(trained_ckpt), "--data.data_dir", str(tmp_path), "--output", out])
    assert result["images"] == TEST_SIZE and sorted(p.name for p in raw.iterdir()) == sorted(
        ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    )  # nothing downloaded
