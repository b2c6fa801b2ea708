"""What a sweep shows beside its table: the study's objective by name (optuna-dashboard), and each trial in
TensorBoard's HPARAMS tab with its status, its searched settings ticked and the metrics it logs."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams.metadata import EXPERIMENT_TAG, SESSION_END_INFO_TAG

from conftest import FAST
from mnist_lightning.sweep import storage
from mnist_lightning.sweep import study as sweep
from mnist_lightning.sweep.options import Search


def hparams(run) -> tuple[api_pb2.Experiment, str | None]:
    """The run's HPARAMS experiment, as TensorBoard reads it, and its status (None: no end written)."""
    events = EventAccumulator(str(run))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    parse = plugin_data_pb2.HParamsPluginData.FromString
    end = content.get(SESSION_END_INFO_TAG)
    status = api_pb2.Status.Name(parse(end).session_end_info.status) if end else None
    return parse(content[EXPERIMENT_TAG]).experiment, status


def test_the_study_names_its_objective_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    options = Search(n_trials=1, study_name="s", storage=url, resume=True)
    study = storage.open_study("s", url, options)
    assert study.metric_names == ["val/acc_best"]  # optuna-dashboard's axis, not "Objective 0"
    again = storage.open_study("s", url, options)  # loaded, or joined by another process
    assert again.metric_names == ["val/acc_best"] and again._study_id == study._study_id


@pytest.fixture(scope="module")
def trials(data_dir, tmp_path_factory) -> tuple[list, Path]:
    """A sweep's trials, one of each end (complete, pruned, failed), and its folder."""
    root = tmp_path_factory.mktemp("sweep")
    args = ["--data.data_dir", str(data_dir), *FAST, "--trainer.default_root_dir", str(root)]
    args += ["--data.batch_size", "32", "--study_name", "h", "--prune_startup_trials", "1"]
    args += ["--prune_warmup_epochs", "0", "--trainer.max_epochs", "2"]
    sweep.cli_main([*args, "--n_trials", "1"])
    sweep.cli_main([*args, "--resume", "--n_trials", "2", "--model.lr", "1e-7"])  # cannot learn: pruned
    study = sweep.cli_main([*args, "--resume", "--n_trials", "3", "--model.lr", "1e30"])  # a NaN loss: failed
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    return study.trials, root / "lightning_logs" / "sweep-h"


@pytest.mark.slow
def test_hparams_mark_each_trials_end_and_open_on_its_searched_settings(trials):
    trials, folder = trials
    # TensorBoard has no "pruned": a trial stopped short is no success.
    statuses = ["STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_FAILURE"]
    for trial, status in zip(trials, statuses, strict=True):
        experiment, ended = hparams(folder / f"trial-{trial.number}")
        assert ended == status, trial.number
        # Only what the trial logs (it is not tested), so that its line is drawn; its searched settings ticked.
        assert [m.name.tag for m in experiment.metric_infos] == ["val/acc_best"]
        ticked = {h.name for h in experiment.hparam_infos if h.differs}
        assert ticked == {name.replace(".", "/") for name in trial.params}, trial.number
        assert {"trainer/max_epochs", "trainer/seed", "data/batch_size"}.isdisjoint(ticked)


@pytest.fixture
def tensorboard(trials, tmp_path):
    """TensorBoard over the sweep's folder, on a port it picks itself (--port 0) and prints."""
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(trials[1]), "--host", "127.0.0.1"]
    with open(tmp_path / "tensorboard.log", "w+") as log:
        server = subprocess.Popen([*command, "--port", "0"], stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            while not (url := re.search(r"at (http://\S+/) ", (tmp_path / "tensorboard.log").read_text())):
                assert server.poll() is None and time.monotonic() < deadline, log.read()
                time.sleep(0.2)
            yield url[1]
        finally:
            server.terminate()
            server.wait(timeout=30)


@pytest.mark.slow
def test_in_a_browser_the_sweeps_hparams_draw_a_line_per_scored_trial_and_filter_by_status(
    tensorboard, browser, artifacts
):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{tensorboard}#hparams")
    page.get_by_text("Number of matching session groups: 3").wait_for(timeout=30_000)  # every trial read
    boxes = page.locator("tf-hparams-query-pane paper-checkbox")
    ticked = [b.inner_text().strip() for b in boxes.all() if b.get_attribute("aria-checked") == "true"]
    # The searched settings first, then the objective and every status. TensorBoard takes one trial's list, and
    # ticks five: trial 0's five searched settings, or the others' four (they give the rate) and a constant.
    searched = {"data/shift", "model/label_smoothing", "model/warmup", "model/weight_decay"}
    assert searched <= set(ticked[:5]) and set(ticked[:5]) - searched in ({"model/lr"}, {"data/batch_size"}), ticked
    assert ticked[5:] == ["val/acc_best", "Unknown", "Success", "Failure", "Running"], ticked
    page.locator("tf-hparams-query-pane paper-checkbox", has_text="Failure").click()
    page.get_by_text("Number of matching session groups: 1").wait_for(timeout=10_000)  # the complete trial only
    page.locator("tf-hparams-query-pane paper-checkbox", has_text="Failure").click()
    page.get_by_text("Number of matching session groups: 3").wait_for(timeout=10_000)
    page.get_by_text("PARALLEL COORDINATES VIEW").first.click()
    lines = page.locator("tf-hparams-parallel-coords-plot g.foreground path")
    lines.first.wait_for(timeout=10_000)
    page.screenshot(path=str(artifacts / "sweep-hparams-parallel-coordinates.png"))
    assert lines.count() == 2  # the complete and the pruned trial; the failed one scored nothing
    page.close()


def test_a_plain_fit_declares_its_test_metrics_and_ends_in_success(fit_result):
    experiment, ended = hparams(Path(fit_result["best_model_path"]).parents[1])
    assert [m.name.tag for m in experiment.metric_infos] == ["val/acc_best", "test/acc", "test/loss"]
    ticked = {h.name for h in experiment.hparam_infos if h.differs}
    assert ticked == {"data/batch_size", "model/label_smoothing", "model/lr", "trainer/max_epochs", "trainer/seed"}
    assert ended == "STATUS_SUCCESS"
