"""What a sweep shows beside its table: the study's objective by name (optuna-dashboard), and each trial in
TensorBoard's HPARAMS tab with its status, its searched settings ticked and the metrics it logs."""

from mnist_lightning.sweep import storage
from mnist_lightning.sweep.options import Search


def test_the_study_names_its_objective_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    options = Search(n_trials=1, study_name="s", storage=url, resume=True)
    study = storage.open_study("s", url, options)
    assert study.metric_names == ["val/acc_best"]  # optuna-dashboard's axis, not "Objective 0"
    again = storage.open_study("s", url, options)  # loaded, or joined by another process
    assert again.metric_names == ["val/acc_best"] and again._study_id == study._study_id
