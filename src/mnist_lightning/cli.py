"""One command line for every command: options read from signatures by jsonargparse, as LightningCLI reads
fit's from the constructors, each with ``--help``, ``--config FILE`` and ``--print_config``; and
``mnist-lightning COMMAND``, the console script that runs any of them.
"""

import importlib
import os
import re
import sys
from collections.abc import Callable
from types import UnionType
from typing import Union, get_args, get_origin

from mnist_lightning.errors import UserError, run_main

# Each command's module; its main() runs it. fit is the one documented first.
COMMANDS = {
    "fit": ("mnist_lightning.fit", "train, validate each epoch, test the best checkpoint"),
    "evaluate": ("mnist_lightning.evaluate", "a checkpoint's accuracy per class and confusion matrix"),
    "predict": ("mnist_lightning.predict", "read digits in your own images"),
    "export": ("mnist_lightning.export", "write the network as ONNX or TorchScript"),
    "serve": ("mnist_lightning.serve.server", "the HTTP API and the draw-a-digit page"),
    "sweep": ("mnist_lightning.sweep.study", "search fit's recipe with Optuna"),
}


def prog(command: str) -> str:
    """The name a command's usage line shows: as the user started it."""
    if sys.argv and sys.argv[0].endswith("mnist-lightning"):
        return f"mnist-lightning {command}"
    return f"python -m mnist_lightning.{command}"


def threads() -> int:
    """Every command's intra-op thread policy: one thread, unless OMP_NUM_THREADS says otherwise.

    This MLP's matmuls are too small to share out, and threads that wait for a core another process holds
    cost far more than they give. On 2 cores, beside one busy process, a default fit took 13.3 s on one
    thread and 36.6 s on two; quiet, 13.4 s and 12.2 s (benchmarks/busy.py, medians of 3). The count is
    part of what a seed reproduces (the order of sums), so fit records it in metrics.json.
    Returns the count in use.
    """
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):  # torch reads it at start-up; an explicit choice wins
        torch.set_num_threads(1)
    return torch.get_num_threads()


def usage_error(err: Exception) -> UserError:
    """A command-line parsing error as one line (jsonargparse's can span several), instead of the usage."""
    message = " ".join(str(err).split())
    # For an option that takes a class (--trainer.logger CSVLogger), jsonargparse tries every type the
    # option allows and lists why each failed; only the class's own failure says anything.
    found = re.search(r"Parser key \"([^\"]+)\":.*?Problem with given class_path '([^']+)': (.*?) - Expected", message)
    if found:
        key, path, problem = found.groups()
        name = path.rsplit(".", 1)[-1]
        if missing := re.fullmatch(r"the following arguments are required: (.+)", problem):
            options = ", ".join(f"--{key}.{arg.strip()}" for arg in missing.group(1).split(","))
            return UserError(f"--{key} {name} needs {options} (see --help)")
        return UserError(f"--{key} {name}: {problem} (see --help)")
    # An option that may be null (evaluate's --data.*, null: the checkpoint's) lists why each type failed;
    # null's says nothing, so it reads as the same option without null does (fit's --data.dataset).
    null = r"(Parser key \"[^\"]+\":) Does not validate.*? Errors: - (Expected an? .+?) - Expected a <class 'NoneType'>"
    either = re.search(null + r".* Given value: (.*)", message)
    if either:
        message = "{} {}. Got value: {}".format(*either.groups())
    # These commands once took --save-preprocessed and --normalised-input; every option is snake_case now.
    if kebab := re.search(r"unrecognized arguments:.*?--(\w+(?:-\w+)+)", message):
        return UserError(f"{message} (options are written with _: --{kebab.group(1).replace('-', '_')}; see --help)")
    return UserError(f"{message} (see --help)")


def refuse_aliases(load):
    """Wrap jsonargparse's YAML loader so that a YAML alias is refused before anything is expanded: nested
    aliases (a "billion laughs" file of a few hundred bytes) would grow the config until the process dies.
    A config for these commands never needs one."""

    def load_without_aliases(stream, *args, **kwargs):
        import yaml

        if isinstance(stream, str) and "*" in stream:  # no alias without a *
            for event in yaml.parse(stream, Loader=yaml.SafeLoader):  # events only: nothing is expanded
                if isinstance(event, yaml.AliasEvent):
                    raise yaml.YAMLError(
                        f"YAML aliases (*{event.anchor}) are refused in configs; write the values out instead"
                    )
        return load(stream, *args, **kwargs)

    load_without_aliases.refuses_aliases = True
    return load_without_aliases


def safe_yaml() -> None:
    """Install the alias-refusing YAML loader, once, for every parser of the process."""
    import yaml
    from jsonargparse import get_loader, set_loader

    if not getattr(get_loader("yaml"), "refuses_aliases", False):
        set_loader("yaml", refuse_aliases(get_loader("yaml")), exceptions=(yaml.YAMLError,))


def list_item(hint) -> type | None:
    """T for ``list[T]`` and ``list[T] | None``; None for any other type."""
    for option in get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,):
        if get_origin(option) is list:
            return get_args(option)[0]
    return None


def shell_habits(parser) -> list[str]:
    """Let the options read as argparse's did; returns the list options, whose single words become lists.

    jsonargparse reads a list from one word, ``[a,b]``. A positional list here takes several words instead
    (argparse's nargs="+"), each a file name as it is: ``predict a.png digits/``. A list option also takes
    one plain word as a list of one: ``--cors_origins https://a.example``. A bool option alone means true
    (``--normalised_input``), as a store_true flag did.
    """
    lists = []
    for action in parser._actions:
        hint = getattr(action, "_typehint", None)  # jsonargparse's typed actions check values against it
        if hint is bool:
            action.nargs, action.const = "?", True
        elif (item := list_item(hint)) is not None and not action.option_strings:
            action.nargs, action._typehint, action.metavar = "+", item, action.dest.upper()
        elif item is not None:
            action._typehint = hint | item
            lists.append(action.dest)
    return lists


def command(function: Callable, args: list[str] | None, name: str):
    """Parse ``args`` into ``function``'s parameters and call it; returns what it returns.

    A parameter without a default is positional; one with a default is ``--its_name``; a dataclass is a
    group of options, ``--its_name.field``. The function's docstring gives the description and each
    option's help. Every command gets ``--config FILE`` and ``--print_config``. A mistake is one line.
    """
    from jsonargparse import ArgumentError, auto_parser

    safe_yaml()
    parser = auto_parser(function, prog=prog(name), exit_on_error=False)
    lists = shell_habits(parser)
    try:
        config = parser.parse_args(args)
    except ArgumentError as err:
        raise usage_error(err) from None
    for dest in lists:
        if isinstance(config.get(dest), str):
            config[dest] = [config[dest]]
    options = parser.instantiate(config)  # dataclass groups become their dataclass
    options.pop("config", None)
    return function(**options)


def main() -> None:
    """``mnist-lightning COMMAND [OPTIONS]``: the same commands as ``python -m mnist_lightning.COMMAND``."""
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
        print("usage: mnist-lightning COMMAND [--help] [OPTIONS]\n\ncommands:\n" + "\n".join(lines))
        raise SystemExit(0 if args else 2)
    if args[0] not in COMMANDS:
        run_main(lambda _: _unknown(args[0]), [])
    module = importlib.import_module(COMMANDS[args[0]][0])
    sys.argv = [sys.argv[0], *args[1:]]  # each command reads its options from sys.argv, after its name
    module.main()


def _unknown(name: str) -> None:
    raise UserError(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)} (mnist-lightning --help)")
