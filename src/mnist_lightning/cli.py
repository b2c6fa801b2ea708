"""One command line for every command: options read from signatures by jsonargparse, as LightningCLI reads
fit's from the constructors, each with ``--help``, ``--config FILE`` and ``--print_config``; and
``mnist-lightning COMMAND``, the console script that runs any of them.
"""

import importlib
import re
import sys
from collections.abc import Callable

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


def command(function: Callable, args: list[str] | None, name: str):
    """Parse ``args`` into ``function``'s parameters and call it; returns what it returns.

    A parameter without a default is positional; one with a default is ``--its_name``. The function's
    docstring gives the description and each option's help. A mistake is one line (see --help).
    """
    from jsonargparse import ArgumentError, auto_cli

    safe_yaml()
    try:
        return auto_cli(function, args=args, prog=prog(name), exit_on_error=False)
    except ArgumentError as err:
        raise usage_error(err) from None


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
