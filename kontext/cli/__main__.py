"""``python -m kontext.cli``: the ``kontext`` command."""

from kontext.cli import app

app()
