"""Where the API key comes from: ``--api_key_file``, ``$MNIST_API_KEY`` or ``--api_key``, never silently none.

A key on the command line is visible to every user of the machine in ``ps``; a file or the environment
is not. An empty key would leave the API open while its operator believes it closed, so it is refused.
"""

import os
import re

from mnist_lightning.errors import UserError

KEY_VARIABLE = "MNIST_API_KEY"


def api_key(given: str | None, key_file: str | None) -> str | None:
    """The key ``POST /predict`` needs, from the option, the file or the environment; None: no key."""
    if given is not None and key_file is not None:
        raise UserError("give the API key one way: --api_key or --api_key_file, not both")
    if key_file is not None:
        try:
            with open(key_file, encoding="utf-8") as file:
                key, source = file.read().strip(), f"--api_key_file {key_file}"
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(
                f"cannot read --api_key_file {key_file} ({getattr(err, 'strerror', None) or err})"
            ) from None
    elif given is not None:
        key, source = given, "--api_key"
    elif KEY_VARIABLE in os.environ:
        key, source = os.environ[KEY_VARIABLE], f"${KEY_VARIABLE}"
    else:
        return None
    if not key:
        raise UserError(
            f"{source} is empty, which would leave the API open; give a key, or none at all to serve without one"
        )
    if not re.fullmatch(r"[!-~]+", key):  # a header carries it: anything else could never match
        raise UserError(f"the API key from {source} must be printable ASCII without spaces")
    return key


def on_command_line(args: list[str]) -> bool:
    """Whether ``args`` hold a key itself, which ``ps`` shows to every user of the machine."""
    return any(arg == "--api_key" or arg.startswith("--api_key=") for arg in args)
