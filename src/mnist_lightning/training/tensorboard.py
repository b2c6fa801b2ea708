"""What fit shows in TensorBoard: the learning curves first, the HPARAMS table, pictures of the test results
(drawn in ``figures``)."""

import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.plugins.hparams.api_pb2 import Status
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from torchmetrics.classification import MulticlassConfusionMatrix

from mnist_lightning.calibration import BINS, reliability
from mnist_lightning.training.calibration import temperature_of
from mnist_lightning.training.figures import confusion_figure, mistakes_figure, reliability_figure

if TYPE_CHECKING:
    pass

MISTAKES_SHOWN = 64  # misread test digits pictured
# fit's HPARAMS columns ticked when TensorBoard opens (it ticks five); the others are a click away.
TICKED = ("data/batch_size", "model/label_smoothing", "model/lr", "trainer/max_epochs", "trainer/seed")
METRICS = ("val/acc_best", "test/acc", "test/loss")  # the HPARAMS metrics; the test's, where the run is tested


# TensorBoard's Custom Scalars tab: train and val on the same axes.
LAYOUT = {
    "learning curves": {
        "loss, train and val": ["Multiline", ["^train/loss$", "^val/loss$"]],
        "accuracy, train and val": ["Multiline", ["^train/acc$", "^val/acc$", "^val/acc_best$"]],
        "training loss per step": ["Multiline", ["^train/loss_step$"]],
        "learning rate": ["Multiline", ["^lr$"]],
    }
}


class FirstWrite:
    """Stands in for the SummaryWriter, which makes its events file as soon as it exists, until its first use."""

    def __init__(self, make):
        self.make, self.writer = make, None

    def __getattr__(self, name):
        if self.writer is None:
            self.writer = self.make()
        return getattr(self.writer, name)

    def flush(self) -> None:  # Lightning's finalize, after a refusal: nothing to flush yet
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class RunLogger(TensorBoardLogger):
    """fit's default logger: TensorBoard, its tags the metric keys the console and metrics.json show, one
    ``lr`` whatever the schedule, and without Lightning's ``epoch`` scalar, a staircase that says nothing
    the step axis does not.

    Lightning asks for the writer before any callback's setup; its events file is made at the first
    write instead, so that a run refused in setup (checks.RunChecks) leaves its folder as it was.

    ``ticked``: the HPARAMS columns ticked when TensorBoard opens; a sweep's trial gives its searched settings.
    """

    def __init__(self, *args, ticked: Sequence[str] = TICKED, **kwargs):
        super().__init__(*args, **kwargs)
        self.ticked = tuple(ticked)

    @property
    def experiment(self):
        if self._experiment is None and not rank_zero_only.rank:
            self._experiment = FirstWrite(self._make_writer)
        return super().experiment

    def _make_writer(self):
        self._experiment = None
        return TensorBoardLogger.experiment.fget(self)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        # LearningRateMonitor names the rate lr-AdamW when no scheduler names it; with one, lr.
        renamed = {("lr" if k.startswith("lr-") else k): v for k, v in metrics.items() if k != "epoch"}
        super().log_metrics(renamed, step)


def log_hparams(writer: SummaryWriter, params: dict, metric_names: Sequence[str], ticked: Sequence[str]):
    """Register the run in the HPARAMS tab, which shows each metric's last logged value; returns the
    session's end, for end_session.

    TensorBoardLogger.log_hyperparams would also log the metrics once at step 0 as placeholders,
    which would put a false first point on their curves; so torch's summaries are written here.
    TensorBoard ticks the first five columns, those marked as differing between runs first, by
    name: ``ticked`` are marked so.
    """
    flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()}
    experiment, start, end = hparams(flat, dict.fromkeys(metric_names, 0.0))
    with plugin_data(experiment) as data:
        for info in data.experiment.hparam_infos:
            info.differs = info.name in ticked
    for summary in (experiment, start):
        writer._get_file_writer().add_summary(summary)
    return end


def end_session(writer: SummaryWriter, end, status: str) -> None:
    """The run's status in HPARAMS, written once, at its end: TensorBoard keeps the first one a run writes."""
    with plugin_data(end) as data:
        data.session_end_info.status = Status.Value(status)
        data.session_end_info.end_time_secs = time.time()
    writer._get_file_writer().add_summary(end)
    writer.flush()


@contextmanager
def plugin_data(summary):
    """The HPARAMS data of one of torch's summaries, to change in place."""
    value = summary.value[0]
    data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
    yield data
    value.metadata.plugin_data.content = data.SerializeToString()


class RunReport(Callback):
    """What fit reports besides the curves: the run in TensorBoard's Custom Scalars and HPARAMS tabs, with
    the model's, the data's and the Trainer's settings; per-digit test accuracy; and in TensorBoard the
    confusion matrix, the reliability diagram and the first misread digits. One callback, as Lightning calls
    every callback at every hook, each step too.
    """

    session = None  # the run's writer and its HPARAMS session's end, from the start of training to its end

    def on_train_start(self, trainer: Trainer, pl_module) -> None:
        if not (isinstance(trainer.logger, TensorBoardLogger) and trainer.is_global_zero):
            return
        data = trainer.datamodule.hparams if trainer.datamodule else {}
        settings = {
            "max_epochs": trainer.max_epochs,
            "seed": int(os.environ.get("PL_GLOBAL_SEED", -1)),  # -1: no --seed_everything
            "precision": trainer.precision,
            "devices": trainer.num_devices * trainer.num_nodes,
            "accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
        }
        params = {
            f"{group}/{k}": v
            for group, hp in (("model", pl_module.hparams), ("data", data), ("trainer", settings))
            for k, v in hp.items()
            if not k.startswith("_")  # LightningCLI's bookkeeping, not a hyperparameter
        }
        writer = trainer.logger.experiment
        writer.add_custom_scalars(LAYOUT)
        # A metric never logged draws no line in the parallel coordinates: an untested run (a sweep's trial)
        # declares no test metric.
        metrics = [m for m in METRICS if trainer.limit_test_batches or not m.startswith("test/")]
        end = log_hparams(writer, params, metrics, getattr(trainer.logger, "ticked", TICKED))
        self.session = writer, end

    def on_fit_end(self, trainer: Trainer, pl_module) -> None:
        self._end("STATUS_SUCCESS")

    def on_exception(self, trainer: Trainer, pl_module, exception: BaseException) -> None:
        # TensorBoard knows no "pruned": a sweep's pruned trial, stopped short, is not a success and shows as a
        # failure, like a NaN loss or a crash. Ctrl-C and SIGTERM stop a run that --ckpt_path last may continue
        # in the same folder, and so leave its status open (Unknown), as the first one written would stay.
        if not isinstance(exception, KeyboardInterrupt | SystemExit):
            self._end("STATUS_FAILURE")

    def _end(self, status: str) -> None:
        if self.session is not None:  # this process logged the run's hparams (rank 0 only)
            end_session(*self.session, status)
            self.session = None

    def on_test_start(self, trainer: Trainer, pl_module) -> None:
        # validate_args=False: the argument checks would sync with the device on every update.
        self.confusion = MulticlassConfusionMatrix(10, validate_args=False).to(pl_module.device)
        self.mistakes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.shown = 0
        # Bin sums before and after the temperature (the tested checkpoint's), for the reliability diagram.
        self.temperature = temperature_of(trainer) or 1.0
        self.bins = torch.zeros(2, 3, BINS, dtype=torch.float64, device=pl_module.device)

    def on_test_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        x, y = batch
        predicted = outputs.argmax(1)
        self.confusion.update(predicted, y)
        for i, t in enumerate((1.0, self.temperature)):
            self.bins[i] += reliability((outputs.detach().double() / t).softmax(1), y)
        if self.shown < MISTAKES_SHOWN:
            wrong = predicted != y
            self.mistakes.append((x[wrong], y[wrong], predicted[wrong]))
            self.shown += len(self.mistakes[-1][1])  # a host sync, on the first batches only

    def on_test_epoch_end(self, trainer: Trainer, pl_module) -> None:
        matrix = self.confusion.compute()  # summed over DDP ranks
        bins = trainer.strategy.reduce(self.bins, reduce_op="sum")  # every rank must take part
        # A digit's accuracy is its recall: the share of its images read right (rows: the true digit; NaN: none).
        for digit, accuracy in enumerate(matrix.diag() / matrix.sum(1)):
            pl_module.log(f"test/acc_digit_{digit}", accuracy, sync_dist=True)  # equal on every rank already
        if isinstance(trainer.logger, TensorBoardLogger) and trainer.is_global_zero:
            writer, step = trainer.logger.experiment, trainer.global_step
            writer.add_figure("test/confusion_matrix", confusion_figure(matrix), step)
            writer.add_figure("test/reliability_diagram", reliability_figure(*bins, self.temperature), step)
            if self.mistakes:
                images, true, predicted = (torch.cat(p)[:MISTAKES_SHOWN] for p in zip(*self.mistakes, strict=True))
                writer.add_figure("test/mistakes", mistakes_figure(images, true, predicted), step)
        self.mistakes.clear()
