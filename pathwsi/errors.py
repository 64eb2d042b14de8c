"""The root of every user-facing error: a bad input, setting or file, with a message that names it and says
what to do. `pathwsi` (cli.main) prints such an error without a traceback; anything else is a bug."""

from __future__ import annotations

# What an error about a missing tiatoolbox extra (slide backends, stain methods) tells the user to run.
INSTALL_TIATOOLBOX = "pip install -e '.[tiatoolbox]' -c constraints/tiatoolbox.txt"


class PathwsiError(Exception):
    """A user-facing problem; its message names the slide, file, column or key and the fix."""


class ConfigError(PathwsiError):
    """One or more problems with the config or the sample sheet; `problems` lists them all."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{listing}")
