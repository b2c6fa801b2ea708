"""A sweep on PostgreSQL, 1 process against 2: ``python benchmarks/sweep_postgres.py DATA_DIR [--trials 6] [...]``.

Starts a throwaway PostgreSQL server (tests/postgres.py: initdb and pg_ctl on a free loopback port) and
runs ``python -m mnist_lightning.sweep`` against it, as on machines that share one study: a study of
--trials trials by one process, then another by two processes started at once with the same command line
(``--study_name NAME --resume``), taking turns for --rounds; the sweep's own options may follow. Trials
are not pruned, so that every variant does the same work. Prints a markdown table: wall seconds from
launch to the last exit, and the trials each process ran, read from its "trial N:" lines.
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres import Cluster  # noqa: E402  (a test helper, beside the tests that start the same server)


def sweep(cluster: Cluster, name: str, processes: int, args: list[str], cwd: Path) -> tuple[float, list[list[int]]]:
    """Wall seconds until every process is done, and the trial numbers each one ran."""
    command = [sys.executable, "-m", "mnist_lightning.sweep", *args, "--study_name", name, "--resume"]
    command += ["--storage", cluster.url(), "--trainer.default_root_dir", str(cwd)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(processes)
    ]
    outs = [p.communicate()[0] for p in procs]
    took = time.perf_counter() - start
    if any(p.returncode for p in procs):
        raise SystemExit("a sweep process failed:\n" + "\n".join(outs))
    return took, [sorted(int(n) for n in re.findall(r"^trial (\d+):", out, re.M)) for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    options, more = parser.parse_known_args()  # any other option goes to the sweep: --data.val_size 100, say
    args = [*more, "--n_trials", str(options.trials), "--pruner", "none", "--data.data_dir", options.data_dir]
    args += ["--trainer.max_epochs", str(options.epochs)]
    rows = []
    with Cluster() as cluster:
        for round_ in range(options.rounds):
            for processes in (1, 2):
                name = f"r{round_}-p{processes}"
                took, ran = sweep(cluster, name, processes, args, cluster.folder)
                trials = optuna.load_study(study_name=name, storage=cluster.url()).get_trials()
                complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
                rows.append((round_ + 1, processes, took, " + ".join(str(len(r)) for r in ran), complete))
    print(f"{options.trials} trials of {options.epochs} epoch(s), --pruner none, PostgreSQL on loopback\n")
    print("| round | processes | wall s | trials per process | complete in the study |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| {} | {} | {:.1f} | {} | {} |".format(*row))


if __name__ == "__main__":
    main()
