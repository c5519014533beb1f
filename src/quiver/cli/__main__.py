"""``python -m quiver.cli``: the ``quiver`` command, where the console script is not on PATH."""

from quiver.cli import main

main()
