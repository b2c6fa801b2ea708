"""Where a study lives: an Optuna RDB (SQLite by default) or a journal file, opened by every process of it."""

import time
import warnings

import optuna
import sqlalchemy.exc

from mnist_lightning.errors import UserError


def open_study(name: str, url: str, options) -> optuna.Study:
    """Create the study, or with ``options.resume`` load it (or join its creation by another process)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial is ours to print
    with warnings.catch_warnings():  # multivariate and constant_liar are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: a trial still running counts as a poor one, so that side-by-side trials differ.
        sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True)
    pruner = optuna.pruners.MedianPruner(options.prune_startup_trials, options.prune_warmup_epochs)
    pruner = pruner if options.pruner == "median" else optuna.pruners.NopPruner()
    try:
        if "://" in url:  # SQLite waits up to a minute for another process's write, not 5 s
            timeout = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
            storage = rdb_storage(url, timeout)
        else:
            storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
        exists = name in {s.study_name for s in storage.get_all_studies()}
        if exists and not options.resume:
            raise UserError(f"study {name} exists in {url}; pass --resume to continue it, or another --study_name")
        kind = dict(direction="maximize", sampler=sampler, pruner=pruner)
        return optuna.create_study(study_name=name, storage=storage, load_if_exists=options.resume, **kind)
    except optuna.exceptions.DuplicatedStudyError:  # created by another process a moment ago
        raise UserError(f"study {name} exists in {url}; pass --resume to join it") from None
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, OSError) as err:
        reason = " ".join(str(err).split("\n")[0].split())
        raise UserError(
            f"--storage {url}: cannot open it ({reason}); give sqlite:///FILE, postgresql://..., mysql://... "
            "(with its driver installed) or a journal file's path"
        ) from None


def rdb_storage(url: str, engine_kwargs: dict) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage; two processes making a new database's tables at once collide on its schema
    version (a UNIQUE constraint, or a table that already exists), and the one that lost simply retries."""
    for attempt in range(10):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as err:
            collided = isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)
            if not collided or attempt == 9:
                raise
            time.sleep(0.2)
