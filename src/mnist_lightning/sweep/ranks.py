"""A sweep whose trials train under DDP (``--trainer.devices N --trainer.strategy ddp``): rank zero is the sweep.

Lightning's launcher starts a DDP fit's other ranks by running the command line again, once, at the first
DDP trial: here, the whole sweep command. Such a process opens no study and samples nothing: it follows,
training each trial with the fit command line that rank zero sends it and stopping where rank zero's
pruner says. Its first trial comes in the environment the launcher copies; the process group then
outlives each fit (Lightning makes it once), and each next trial comes by broadcast over it, until
rank zero says the search is done.
"""

import json
import os

import torch.distributed

from mnist_lightning.errors import UserError

# The first DDP trial's fit command line, for the ranks Lightning starts during it.
TRIAL = "MNIST_LIGHTNING_SWEEP_TRIAL"


def follows() -> bool:
    """Whether this process is a rank other than zero of a DDP trial, started by the sweep's launcher; a sweep
    started as one of several processes by another launcher is refused."""
    if TRIAL in os.environ and os.environ.get("LOCAL_RANK", "0") != "0":
        return True
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        raise UserError(
            "the sweep was started as one of several DDP processes (torchrun, srun): start it once per machine, "
            "and its DDP trials' ranks are started for each trial (--trainer.devices N --trainer.strategy ddp)"
        )
    return False


def share(args: list[str], prune: bool) -> None:
    """Rank zero: the next trial's fit command line, and whether it is pruned, for the ranks that follow."""
    trial = {"args": args, "prune": prune}
    os.environ[TRIAL] = json.dumps(trial)  # for a launcher that has not started them yet
    if torch.distributed.is_initialized():  # started at an earlier trial, and waiting
        torch.distributed.broadcast_object_list([trial], src=0)


def finish() -> None:
    """Rank zero: the search is done; the other ranks end."""
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list([None], src=0)


def follow() -> None:
    """A rank other than zero: train each trial rank zero sends, until it sends none."""
    import optuna

    from mnist_lightning import fit
    from mnist_lightning.sweep.trials import Pruning

    trial = json.loads(os.environ[TRIAL])
    while trial is not None:
        try:  # the same callbacks as rank zero's, for the same collectives
            fit.cli_main(trial["args"], callbacks=(Pruning(None),) if trial["prune"] else ())
        except (optuna.TrialPruned, UserError):
            pass  # rank zero tells the study, and says why
        received = [None]
        torch.distributed.broadcast_object_list(received, src=0)
        (trial,) = received
