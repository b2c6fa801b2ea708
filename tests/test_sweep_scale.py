"""A sweep beyond one process: DDP trials, one GPU a worker, and trials whose process died."""

import json
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

SPY = '''
import json, os
from lightning.pytorch import Callback

class Spy(Callback):
    """Each rank's record of each epoch it trained, and with what."""

    def on_train_epoch_end(self, trainer, pl_module):
        seen = {"rank": trainer.global_rank, "ranks": trainer.world_size, "pid": os.getpid(),
                "trial": trainer.logger.version, "epoch": trainer.current_epoch}
        seen.update({f"model.{k}": v for k, v in pl_module.hparams.items()})
        seen.update({f"data.{k}": v for k, v in trainer.datamodule.hparams.items()})
        with open(os.environ["SPY_RECORD"], "a") as record:
            record.write(json.dumps(seen, default=str) + "\\n")
'''


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
def test_ddp_trials_follow_rank_zeros_trial_and_stop_together_when_pruned(data_dir, tmp_path):
    (tmp_path / "spy.py").write_text(SPY)
    record = tmp_path / "spy.jsonl"
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    prune = ["--prune_startup_trials", "2", "--prune_warmup_epochs", "0", "--trainer.callbacks", "spy.Spy"]
    cmd = command(data_dir, tmp_path, *ddp, *prune, "--study_name", "d")
    run([*cmd, "--n_trials", "2"], tmp_path, SPY_RECORD=str(record))
    # A rate that cannot learn: its first epoch is far below the others', and it is pruned there.
    out = run([*cmd, "--n_trials", "3", "--resume", "--model.lr", "1e-7"], tmp_path, SPY_RECORD=str(record))
    assert "trial 2 pruned after epoch 1" in out

    folder = tmp_path / "lightning_logs" / "sweep-d"
    storage = f"sqlite:///{folder / 'study.db'}"
    assert optuna.get_all_study_names(storage) == ["d"]  # no study of another rank's, here or elsewhere
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["sweep-d"]
    assert list(tmp_path.rglob("study.db")) == [folder / "study.db"] and list(tmp_path.rglob("best.yaml")) == [
        folder / "best.yaml"
    ]
    trials = optuna.load_study(study_name="d", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED]

    seen = [json.loads(line) for line in record.read_text().splitlines()]
    # Two ranks, the other one started once for each sweep command, and following it from trial to trial.
    assert {s["ranks"] for s in seen} == {2} and len({s["pid"] for s in seen if s["rank"] == 1}) == 2
    for t in trials:
        epochs = [s for s in seen if s["trial"] == f"trial-{t.number}"]
        # Both ranks trained the same epochs, each with the trial's own values: 2 epochs, or 1 when pruned.
        ran = sorted((s["epoch"], s["rank"]) for s in epochs)
        assert ran == [(e, r) for e in range(1 if t.state == TrialState.PRUNED else 2) for r in (0, 1)]
        for s in epochs:
            assert all(s[name] == value for name, value in t.params.items()), (s, t.params)
    assert seen[-1]["model.lr"] == 1e-7


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
