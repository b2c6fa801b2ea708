import csv
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import foreign_images, run_module, spy_program
from mnist_lightning.data import MNISTDataModule
from mnist_lightning.errors import UserError, run_main
from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.files.idx import load_split
from mnist_lightning.files.images import UnsupportedImage, preprocess, read_image
from mnist_lightning.net import normalise
from mnist_lightning.predict import cli_main


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    weights = image.astype(np.float64)
    rows, cols = np.indices(image.shape)
    return (rows * weights).sum() / weights.sum(), (cols * weights).sum() / weights.sum()


def drawn_seven(size=(200, 300), ink=0, paper=255) -> Image.Image:
    """A thick seven drawn the way a paint program would: dark ink on white paper."""
    image = Image.new("L", size, paper)
    ImageDraw.Draw(image).line([(60, 40), (140, 40), (100, 260)], fill=ink, width=18)
    return image


def png_claiming(path, width: int, height: int) -> None:
    """A tiny PNG whose header claims a huge size: what a decompression bomb looks like on open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def test_light_background_is_inverted():
    image = np.random.default_rng(0).integers(0, 100, (28, 28)).astype(np.uint8)
    image[5:20, 10:14] = 255
    assert np.array_equal(preprocess(Image.fromarray(255 - image)), image)


def test_mnist_style_pngs_give_exactly_the_datamodules_tensors(data_dir, tmp_path):
    images, _ = load_split(data_dir / "MNIST" / "raw", "test")
    for i, image in enumerate(images[:, 0].numpy()):
        Image.fromarray(image).save(tmp_path / f"{i:03d}.png")
    data = MNISTDataModule(str(data_dir), val_size=100, mean=0.2, std=0.7)
    data.setup("test")
    read = np.stack([read_image(tmp_path / f"{i:03d}.png") for i in range(len(images))])
    assert torch.equal(normalise(torch.from_numpy(read).unsqueeze(1), 0.2, 0.7), data.test_set.images)


def test_crop_scale_and_centre_of_mass():
    image = np.zeros((300, 200), np.uint8)
    image[20:280, 120:180] = 255  # a 260x60 block, off-centre
    image[250:280, 20:120] = 255  # and a foot to its left, so the centre of mass is not the box's
    out = preprocess(Image.fromarray(image))
    rows, cols = np.nonzero(out)
    assert (np.ptp(rows) + 1, np.ptp(cols) + 1) == (20, 12)  # 260x160 scaled by 20/260
    assert centre_of_mass(out) == pytest.approx((13.5, 13.5), abs=0.5)
    box_centre = ((rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2)
    assert box_centre != pytest.approx((13.5, 13.5), abs=0.5)


def test_a_tall_digit_keeps_its_aspect_ratio():
    out = preprocess(drawn_seven())
    rows, cols = np.nonzero(out > 0)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert height == 20 and 8 <= width <= 11  # the stroke spans 98x238 px: 20 tall, ~8 wide plus blur


def test_a_big_photo_reads_like_a_small_drawing():
    small, big = preprocess(drawn_seven()), preprocess(drawn_seven().resize((2000, 3000)))
    assert np.abs(small.astype(int) - big).max() <= 16


def test_transparent_canvas_is_flattened_whatever_the_ink_colour():
    expected = preprocess(drawn_seven())
    for ink in (0, 255):
        alpha = 255 - np.asarray(drawn_seven())  # opaque where drawn, transparent elsewhere
        rgba = np.stack([np.full_like(alpha, ink)] * 3 + [alpha], axis=-1)
        assert np.array_equal(preprocess(Image.fromarray(rgba, "RGBA")), expected), ink


def test_16_bit_images_read_like_8_bit_ones():
    for image in (drawn_seven(), drawn_seven().resize((28, 28))):
        wide = Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)
        assert wide.mode.startswith("I;16")
        assert np.array_equal(preprocess(wide), preprocess(image))


def test_unreadable_files_say_why(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    drawn_seven().save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:300])
    png_claiming(tmp_path / "huge.png", 8000, 8000)  # over our limit
    png_claiming(tmp_path / "bomb.png", 50000, 50000)  # over Pillow's own
    Image.new("L", (50, 50), 255).save(tmp_path / "blank.png")
    expected = {
        "empty.png": "empty file",
        "notes.png": "not an image",
        "cut.png": "cannot be read: image file is truncated",
        "huge.png": "decompression bomb",
        "bomb.png": "decompression bomb",
        "blank.png": "no digit found",
        "missing.png": "cannot be read: No such file",
    }
    for name, message in expected.items():
        with pytest.raises(UserError, match=message):
            read_image(tmp_path / name)
        if name != "missing.png":  # the server's uploads: the same refusal from the bytes alone
            with pytest.raises(UserError, match=message):
                read_image((tmp_path / name).read_bytes())


def test_only_the_documented_formats_are_decoded_and_no_program_runs(tmp_path, monkeypatch):
    bin_dir, ghostscript = spy_program(tmp_path / "bin", "gs")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    foreign = foreign_images(tmp_path / "images")
    assert {"EPS", "XBM", "PCX", "ICO", "PPM", "TGA"} <= foreign.keys()  # Pillow can write them all: opened before
    for path in foreign.values():
        for source in (path, path.read_bytes()):  # a file for predict, bytes as the server gets them
            with pytest.raises(UnsupportedImage, match="only PNG, JPEG, BMP, GIF, WebP or TIFF files are read"):
                read_image(source)
    assert not ghostscript.exists(), ghostscript.read_text()
    # The same EPS, opened the way read_image used to open images, does run Ghostscript: the spy works.
    with pytest.raises(subprocess.CalledProcessError), Image.open(foreign["EPS"]) as image:
        image.load()
    assert ghostscript.exists()


def test_predict_names_a_foreign_format_and_reads_the_rest(trained_ckpt, tmp_path):
    bin_dir, ghostscript = spy_program(tmp_path / "bin", "gs")
    folder = tmp_path / "in"
    drawn_seven().save(tmp_path / "seven.png")
    foreign = foreign_images(folder)
    env_path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_lightning.predict", "--ckpt_path", str(trained_ckpt), str(tmp_path / "seven.png"),
         *map(str, foreign.values())],
        capture_output=True, text=True, env={**os.environ, "PATH": env_path, "PYTHONWARNINGS": "ignore"}, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout.startswith(f"{tmp_path / 'seven.png'}  "), proc.stderr
    refused = [line for line in proc.stderr.splitlines() if "only PNG, JPEG, BMP, GIF, WebP or TIFF files" in line]
    assert len(refused) == len(foreign) and "could not be read" in proc.stderr.splitlines()[-1]
    assert not ghostscript.exists()


@pytest.fixture
def image_folder(tmp_path):
    """Good images in every accepted format and mode, in nested folders, and four bad ones."""
    good = {
        "l.png": drawn_seven(),
        "rgb.jpg": drawn_seven().convert("RGB"),
        "p.gif": drawn_seven().convert("P"),
        "small.bmp": drawn_seven().resize((40, 60)),
        "sub/dark.webp": drawn_seven(ink=255, paper=0),
        "sub/deeper/sixteen.png": Image.fromarray(np.asarray(drawn_seven(), dtype=np.uint16) * 257),
        "sub/rgba.png": Image.fromarray(
            np.stack([np.zeros((300, 200), np.uint8)] * 3 + [255 - np.asarray(drawn_seven())], axis=-1), "RGBA"
        ),
    }
    for name, image in good.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / name)
    (tmp_path / "sub" / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("hello")
    (tmp_path / "sub" / "cut.jpg").write_bytes((tmp_path / "rgb.jpg").read_bytes()[:200])
    png_claiming(tmp_path / "bomb.png", 50000, 50000)
    (tmp_path / "readme.txt").write_text("not searched: not an image suffix")
    return tmp_path, sorted(str(tmp_path / name) for name in good)


def test_the_bytes_of_a_file_read_exactly_like_the_file(image_folder):
    for path in map(Path, image_folder[1]):
        assert np.array_equal(read_image(path.read_bytes()), read_image(path)), path.name


def test_cli_predicts_every_good_image_and_names_each_bad_one(image_folder, trained_ckpt, tmp_path_factory, capsys):
    folder, good = image_folder
    out = tmp_path_factory.mktemp("out")
    args = ["--ckpt_path", str(trained_ckpt), str(folder), "--output", str(out / "p.json")]
    with pytest.raises(SystemExit) as exit_:
        run_main(cli_main, [*args, "--save_preprocessed", str(out / "seen")])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    note, *errors = captured.err.splitlines()
    assert note == f"note: {folder}: skipped what is not an image: 1 .txt"
    assert sorted(line.split(": ")[1] for line in errors[:-1]) == sorted(
        str(folder / name) for name in ("bomb.png", "notes.png", "sub/cut.jpg", "sub/empty.png")
    )
    assert errors[-1] == "error: 4 of 11 files could not be read (listed above); the rest were predicted"
    assert "Traceback" not in captured.err

    lines = captured.out.splitlines()
    assert sorted(line.split("  ")[0] for line in lines) == good
    predictions = json.loads((out / "p.json").read_text())
    assert [p["path"] for p in predictions] == [line.split("  ")[0] for line in lines]
    for p, line in zip(predictions, lines, strict=True):
        probs = [prob for _, prob in p["top3"]]
        assert p["top3"][0] == [p["digit"], p["probability"]] and probs == sorted(probs, reverse=True)
        assert line.split("  ")[1:] == [str(p["digit"]), f"{p['probability']:.3f}", line.split("  ")[3]]
        assert line.split("  ")[3] == "top3 " + " ".join(f"{d}:{q:.3f}" for d, q in p["top3"])
    seen = sorted((out / "seen").iterdir())
    assert len(seen) == 7 and all(Image.open(s).size == (28, 28) for s in seen)
    # The same drawing in any format, mode or colour is the same digit to the model.
    assert len({p["digit"] for p in predictions}) == 1


def test_csv_output_and_predictions_match_the_model_on_mnist_style_pngs(data_dir, trained_ckpt, tmp_path):
    images, _ = load_split(data_dir / "MNIST" / "raw", "test")
    for i, image in enumerate(images[:40, 0].numpy()):
        Image.fromarray(image).save(tmp_path / f"{i:03d}.png")
    predictions = cli_main(["--ckpt_path", str(trained_ckpt), str(tmp_path), "--output", str(tmp_path / "p.csv")])
    model, (mean, std), saved = load_checkpoint(trained_ckpt)
    with torch.inference_mode():
        logits = model(images[:40].float().div(255).sub(mean).div(std))
    probs = (logits / saved["temperature"]).softmax(1)  # calibrated: the checkpoint's temperature
    assert [p["digit"] for p in predictions] == probs.argmax(1).tolist()
    assert torch.tensor([p["logits"] for p in predictions]).sub(logits).abs().max() < 1e-5
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert list(rows[0]) == ["path", "digit", "probability", "digit2", "probability2", "digit3", "probability3"]
    assert [int(r["digit"]) for r in rows] == probs.argmax(1).tolist()
    assert [float(r["probability"]) for r in rows] == pytest.approx(probs.max(1).values.tolist(), abs=1e-6)


def test_bad_output_suffix_is_refused_before_any_work(trained_ckpt, tmp_path):
    with pytest.raises(UserError, match=r"--output .*p.txt must end in .json or .csv"):
        cli_main(["--ckpt_path", str(trained_ckpt), str(tmp_path), "--output", str(tmp_path / "p.txt")])


@pytest.mark.slow
def test_command_line_predicts_the_good_files_despite_a_bad_one(trained_ckpt, tmp_path):
    drawn_seven().save(tmp_path / "seven.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    proc = run_module(
        "mnist_lightning.predict",
        "--ckpt_path",
        str(trained_ckpt),
        "seven.png",
        "broken.png",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0].startswith("error: broken.png: ")
    assert proc.stdout.startswith("seven.png  ") and proc.stdout.count("\n") == 1


def test_a_folder_without_images_is_named(trained_ckpt, tmp_path):
    (tmp_path / "notes.txt").write_text("no digits here")
    with pytest.raises(UserError, match=r"holds no .bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp files"):
        cli_main(["--ckpt_path", str(trained_ckpt), str(tmp_path)])


def test_unwritable_output_is_one_clear_error(trained_ckpt, tmp_path):
    drawn_seven().save(tmp_path / "seven.png")
    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(UserError, match=r"cannot write .*a_file/preds.json .*pass --output somewhere writable"):
        cli_main(
            [
                "--ckpt_path",
                str(trained_ckpt),
                str(tmp_path / "seven.png"),
                "--output",
                str(tmp_path / "a_file" / "preds.json"),
            ]
        )


def test_tiffs_symlinked_folders_and_low_range_images_are_read(trained_ckpt, tmp_path):
    seven = np.asarray(drawn_seven(), dtype=np.float64)
    real = tmp_path / "elsewhere"
    real.mkdir()
    Image.fromarray((seven / 255 * 4095).astype(np.uint16)).save(real / "twelve_bits.png")  # 12 bits in 16
    Image.fromarray((seven / 255).astype(np.float32)).save(real / "float.tiff")  # floats in 0-1
    drawn_seven().save(real / "plain.tif")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "linked").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(folder, target_is_directory=True)  # walked once, not forever
    predictions = cli_main(["--ckpt_path", str(trained_ckpt), str(folder)])
    assert sorted(Path(p["path"]).name for p in predictions) == ["float.tiff", "plain.tif", "twelve_bits.png"]
    images = [read_image(real / name) for name in ("twelve_bits.png", "float.tiff", "plain.tif")]
    # Scaled by their own range, the three are one drawing to within rounding.
    assert max(int(np.abs(a.astype(int) - images[2].astype(int)).max()) for a in images) <= 2


def test_a_closed_stdout_still_writes_the_output_and_ends_quietly(trained_ckpt, tmp_path):
    for i in range(3):
        drawn_seven().save(tmp_path / f"{i}.png")
    out = tmp_path / "p.json"
    command = [sys.executable, "-m", "mnist_lightning.predict", "--ckpt_path", str(trained_ckpt), str(tmp_path)]
    proc = subprocess.Popen([*command, "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head -0`: the reader is gone before the first line
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and stderr == ""
    assert len(json.loads(out.read_text())) == 3


def test_a_file_name_that_is_not_utf8_reaches_the_csv_as_its_bytes(trained_ckpt, tmp_path):
    name = b"caf\xe9.png"  # Latin-1, as an old camera or a Windows share might name it
    drawn_seven().save(Path(os.fsdecode(bytes(tmp_path).rstrip(b"/") + b"/" + name)))
    out = tmp_path / "p.csv"
    cli_main(["--ckpt_path", str(trained_ckpt), str(tmp_path / os.fsdecode(name)), "--output", str(out)])
    rows = out.read_bytes().splitlines()
    assert len(rows) == 2 and rows[1].startswith(bytes(tmp_path) + b"/" + name + b",")
