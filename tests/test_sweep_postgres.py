"""The sweep on a real PostgreSQL server (tests/postgres.py starts one), with URLs as users write them:
postgresql://USER:PASSWORD@HOST:PORT/DATABASE, whose password no line ever shows."""

import re
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from conftest import FAST, run_module
from mnist_lightning.errors import UserError
from mnist_lightning.sweep import storage
from mnist_lightning.sweep import study as sweep
from postgres import PASSWORD, Cluster

# One epoch, batches of 32, no pruning: a trial takes a few seconds.
TINY = [*FAST, "--trainer.max_epochs", "1", "--data.batch_size", "32", "--pruner", "none"]


@pytest.fixture(scope="module")
def cluster():
    try:
        with Cluster() as running:
            yield running
    except RuntimeError as err:  # no binaries, or a server that would not start: say which
        pytest.skip(f"no PostgreSQL server for the test: {err}")


def sweep_args(data_dir, root, url: str, *more: str) -> list[str]:
    return ["--data.data_dir", str(data_dir), *TINY, "--trainer.default_root_dir", str(root), "--storage", url, *more]


def counted(name: str, url: str) -> list[optuna.trial.FrozenTrial]:
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    return [t for t in trials if "uncounted" not in t.user_attrs]


@pytest.mark.slow
def test_two_sweep_processes_share_one_study_and_split_its_trials(cluster, data_dir, tmp_path):
    args = sweep_args(data_dir, tmp_path, cluster.url(), "--n_trials", "4", "--study_name", "two", "--resume")
    command = [sys.executable, "-m", "mnist_lightning.sweep", *args]
    procs = [
        subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = counted("two", cluster.url())
    assert sorted(t.number for t in trials) == [0, 1, 2, 3] and all(t.state == TrialState.COMPLETE for t in trials)
    ran = [{int(n) for n in re.findall(r"^trial (\d+):", out, re.M)} for out in outs]
    assert ran[0] and ran[1] and not ran[0] & ran[1], outs  # each ran some, none ran one twice
    assert {t.number for t in trials} <= ran[0] | ran[1]
    assert all(PASSWORD not in out for out in outs)
    assert optuna.load_study(study_name="two", storage=cluster.url()).metric_names == ["val/acc_best"]


@pytest.mark.slow
def test_n_jobs_workers_get_the_password_by_their_environment_not_their_command_line(
    cluster, data_dir, tmp_path, monkeypatch, capsys
):
    started = []

    def spy(argv, **kwargs):  # the real Popen, recording what `ps` and the worker's environment hold
        started.append((argv, kwargs["env"]))
        return popen(argv, **kwargs)

    popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", spy)
    url = cluster.url()
    args = sweep_args(data_dir, tmp_path, url, "--n_trials", "3", "--n_jobs", "2", "--study_name", "jobs")
    study = sweep.cli_main([*args, f"--storage={url}"])  # given twice, in both spellings
    ((argv, env),) = started
    assert not any(PASSWORD in arg for arg in argv) and env[storage.URL_VARIABLE] == url
    assert argv[-2:] == ["--storage", url.replace(PASSWORD, "***")]
    log = (tmp_path / "lightning_logs" / "sweep-jobs" / "worker-1.log").read_text()
    assert PASSWORD not in log + capsys.readouterr().out
    assert "error" not in log and len([t for t in study.trials if "uncounted" not in t.user_attrs]) == 3
    assert all(PASSWORD not in str(t.user_attrs) for t in study.trials)


def test_a_wrong_password_is_one_line_that_hides_both(cluster, tmp_path):
    wrong = "not-the-" + PASSWORD
    proc = run_module("mnist_lightning.sweep", "--n_trials", "1", "--study_name", "s", "--storage",
                      cluster.url(password=wrong), cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: --storage postgresql://sweeper:***@127.0.0.1:")
    assert 'password authentication failed for user "sweeper"' in proc.stderr
    assert PASSWORD not in proc.stderr + proc.stdout and "not-the-" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "case, said",
    [("database", 'database "nowhere" does not exist'), ("port", "Connection refused Is the server running")],
)
def test_a_missing_database_or_server_is_one_line_without_the_password(cluster, tmp_path, case, said):
    url = cluster.url(database="nowhere") if case == "database" else cluster.url().replace(f":{cluster.port}/", ":1/")
    with pytest.raises(UserError) as raised:
        sweep.cli_main(["--n_trials", "1", "--study_name", "s", "--storage", url])
    line = str(raised.value)
    assert "\n" not in line and said in line and PASSWORD not in line and "sweeper:***@127.0.0.1" in line


@pytest.mark.parametrize(
    "scheme, module, package",
    [("postgresql", "psycopg", "psycopg[binary]"), ("postgresql+psycopg2", "psycopg2", "psycopg2-binary")],
)
def test_a_missing_driver_is_one_line_naming_the_package(tmp_path, monkeypatch, scheme, module, package):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as where the sweep extra's driver is not installed
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    url = f"{scheme}://user:{PASSWORD}@db.example/optuna"
    with pytest.raises(UserError) as raised:
        storage.open_study("s", url, sweep.Search(n_trials=1, study_name="s", storage=url))
    assert str(raised.value) == (
        f"--storage {scheme}://user:***@db.example/optuna: cannot open it: its database driver, "
        f"{module}, is not installed; pip install '{package}'"
    )


def test_a_workers_hidden_url_is_made_whole_only_by_its_own_url(monkeypatch):
    url = f"postgresql://user:{PASSWORD}@db/optuna"
    args, env = storage.passed_on(["--storage", url, f"--storage={url}", "--n_trials", "2"], url)
    assert args == ["--storage", storage.hidden(url), f"--storage={storage.hidden(url)}", "--n_trials", "2"]
    monkeypatch.setenv(storage.URL_VARIABLE, env[storage.URL_VARIABLE])
    assert storage.whole(storage.hidden(url)) == url
    # Another URL, with or without a password, and a journal file's path, are taken as given.
    for other in ("postgresql://user:***@elsewhere/optuna", "sqlite:///study.db", "study.log"):
        assert storage.whole(other) == other and storage.hidden(other) == other
