"""Where a study lives: an Optuna RDB (SQLite by default) or a journal file, opened by every process of it.

A URL may hold a password (postgresql://user:password@host/db): the sweep shows it hidden wherever it prints
or passes on the URL, the command lines of the processes it starts (which ``ps`` shows to every user) included.
"""

import contextlib
import os
import time
import warnings

import optuna
import sqlalchemy.exc
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from sqlalchemy.engine import make_url

from mnist_lightning.errors import UserError
from mnist_lightning.sweep.options import OBJECTIVE, in_memory

# The whole URL, password included, for the processes that --n_jobs starts: their --storage shows it hidden.
URL_VARIABLE = "MNIST_LIGHTNING_SWEEP_STORAGE"
# The pip package of each driver SQLAlchemy may import under another name.
PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient"}


def open_study(name: str, url: str, options) -> optuna.Study:
    """Create the study, or with ``options.resume`` load it (or join its creation by another process)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial is ours to print
    url = whole(url)
    shown = hidden(url)
    with warnings.catch_warnings():  # multivariate and constant_liar are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: a trial still running counts as a poor one, so that side-by-side trials differ.
        sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True)
    pruner = optuna.pruners.MedianPruner(options.prune_startup_trials, options.prune_warmup_epochs)
    pruner = pruner if options.pruner == "median" else optuna.pruners.NopPruner()
    try:
        if "://" in url:  # SQLite waits up to a minute for another process's write, not 5 s
            timeout = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
            storage = rdb_storage(url, timeout, **heartbeat(options))
        else:
            storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
        exists = name in {s.study_name for s in storage.get_all_studies()}
        if exists and not options.resume:
            raise UserError(f"study {name} exists in {shown}; pass --resume to continue it, or another --study_name")
        kind = dict(direction="maximize", sampler=sampler, pruner=pruner)
        study = optuna.create_study(study_name=name, storage=storage, load_if_exists=options.resume, **kind)
    except optuna.exceptions.DuplicatedStudyError:  # created by another process a moment ago
        raise UserError(f"study {name} exists in {shown}; pass --resume to join it") from None
    except ImportError as err:  # Optuna's, raised from SQLAlchemy's import of the driver
        raise missing_driver(url, err) from None
    except sqlalchemy.exc.DBAPIError as err:  # the server's answer: refused, a wrong password, no such database
        reason = one_line(str(err.orig), url)
        raise UserError(
            f"--storage {shown}: cannot open it ({reason}); check that the server runs there and the URL's "
            "user, password and database"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, OSError) as err:
        reason = one_line(str(err).split("\n")[0], url)
        raise UserError(
            f"--storage {shown}: cannot open it ({reason}); give sqlite:///FILE, postgresql://..., mysql://... "
            "(with its driver installed) or a journal file's path"
        ) from None
    # Named, so that optuna-dashboard and plots say val/acc_best, not "Objective 0".
    if study.metric_names != [OBJECTIVE]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([OBJECTIVE])
    return study


def hidden(url: str) -> str:
    """The URL as the sweep prints it or passes it on a command line: its password, if any, as ***."""
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:  # not a URL: a journal file's path
        return url
    return url if parsed.password is None else parsed.render_as_string(hide_password=True)


def one_line(text: str, url: str) -> str:
    """An error's text on one line, with the URL's password hidden wherever the driver repeated it."""
    text = text.replace(url, hidden(url))
    password = make_url(url).password if hidden(url) != url else None
    return " ".join((text.replace(password, "***") if password else text).split())


def whole(url: str) -> str:
    """The URL a worker was given hidden, made whole again from its environment; any other as it is."""
    given = os.environ.get(URL_VARIABLE)
    return given if given and hidden(given) == url else url


def passed_on(args: list[str], url: str) -> tuple[list[str], dict[str, str]]:
    """A worker's command line, with the URL's password hidden, and the environment that holds it whole."""
    url = whole(url)
    return [arg.replace(url, hidden(url)) for arg in args], {URL_VARIABLE: url}


def missing_driver(url: str, err: ImportError) -> UserError:
    """One line naming the package to install for the driver SQLAlchemy could not import."""
    cause = err.__cause__ if isinstance(err.__cause__, ImportError) else err
    module = (cause.name or make_url(url).get_driver_name()).split(".")[0]
    return UserError(
        f"--storage {hidden(url)}: cannot open it: its database driver, {module}, is not installed; "
        f"pip install '{PACKAGES.get(module, module)}'"
    )


def rdb_storage(url: str, engine_kwargs: dict, **kwargs) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage; two processes making a new database's tables at once collide on its schema
    version (a UNIQUE constraint, or a table that already exists), and the one that lost simply retries."""
    for attempt in range(10):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as err:
            collided = isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)
            if not collided or attempt == 9:
                raise
            time.sleep(0.2)


def heartbeat(options) -> dict:
    """Optuna's heartbeat, for RDB storages: a process that dies mid-trial (kill -9, a lost machine) leaves its
    trial running; once the trial's last beat is older than the grace period, the next process to look fails
    it and asks for its parameters again, twice at most. A journal file has no heartbeat, and SQLite in
    memory, one process's, needs none."""
    if options.storage and in_memory(options.storage):
        return {}
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
    return dict(
        heartbeat_interval=options.heartbeat_interval,
        grace_period=options.grace_period,
        heartbeat_stale_trial_callback=retry,
    )


def has_heartbeat(study: optuna.Study) -> bool:
    """Whether the study's storage beats (RDB) or not (a journal file)."""
    return is_heartbeat_enabled(study._storage)


@contextlib.contextmanager
def beating(study: optuna.Study, trial: optuna.Trial):
    """The trial's heartbeat while it runs. study.optimize beats for its trials; the sweep asks and tells
    (to count trials across processes), so it starts Optuna's own heartbeat thread as optimize does."""
    with get_heartbeat_thread(trial._trial_id, study._storage):
        yield
