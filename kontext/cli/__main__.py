"""``python -m kontext.cli``: the ``kontext`` command."""

from kontext.cli import main

main()
