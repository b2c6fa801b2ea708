"""A sweep beyond one process: DDP trials, one GPU a worker, and trials whose process died."""

import signal
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from conftest import FAST
from mnist_lightning.sweep import study as sweep
from mnist_lightning.sweep.options import Search


def command(data_dir, root, *more: str) -> list[str]:
    args = ["--data.data_dir", str(data_dir), *FAST, "--trainer.default_root_dir", str(root), *more]
    return [sys.executable, "-m", "mnist_lightning.sweep", *args]


def run(cmd, cwd, **env) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env={**_env(), **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.mark.slow
def test_a_trial_whose_process_was_killed_fails_and_is_tried_again_on_resume(data_dir, tmp_path):
    cmd = command(data_dir, tmp_path, "--n_trials", "3", "--pruner", "none", "--study_name", "k")
    cmd += ["--heartbeat_interval", "1", "--grace_period", "2", "--trainer.max_epochs", "6"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, env=_env())
    folder = tmp_path / "lightning_logs" / "sweep-k"
    while not (folder / "trial-1" / "checkpoints" / "last.ckpt").exists():  # trial 1, after its first epoch
        assert proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    storage = f"sqlite:///{folder / 'study.db'}"
    killed = optuna.load_study(study_name="k", storage=storage).trials
    assert [t.state for t in killed] == [TrialState.COMPLETE, TrialState.RUNNING]

    out = run([*cmd, "--resume"], tmp_path)
    trials = optuna.load_study(study_name="k", storage=storage).trials
    states = Counter(t.state.name for t in trials)
    print("kill -9 then --resume:", dict(states))
    assert states == {"COMPLETE": 3, "FAIL": 1}, out  # none running; the dead one failed, and counts not
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retried) == 1 and retried[0].params == killed[1].params and retried[0].state == TrialState.COMPLETE
    assert "study k: 3 trials, 3 complete" in out or "3 complete" in out


def test_each_n_jobs_worker_gets_its_own_gpu_round_robin(tmp_path, monkeypatch):
    assert [sweep.device_env(i, ["0", "1", "2"]) for i in range(4)] == [
        {"CUDA_VISIBLE_DEVICES": d} for d in ("0", "1", "2", "0")
    ]
    assert sweep.device_env(1, []) == {}  # no GPU: nothing changes
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, GPU-5f2a")  # a list given, UUIDs too, is respected
    assert sweep.gpus() == ["3", "GPU-5f2a"]
    # The environment each worker process is started with.
    started = []
    monkeypatch.setattr(sweep.subprocess, "Popen", lambda argv, env, **kwargs: started.append((argv, env)))
    options = Search(n_trials=4, n_jobs=3)
    for i in (1, 2):
        sweep.spawn(i, ["--n_trials", "4"], options, tmp_path, sweep.gpus())
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["GPU-5f2a", "3"]
    assert [env[sweep.WORKER] for _, env in started] == ["1", "2"] and started[0][0][-2:] == ["--n_trials", "4"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # none: nothing changes
    assert sweep.gpus() == [] and sweep.device_env(1, sweep.gpus()) == {}
