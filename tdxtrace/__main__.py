"""``python -m tdxtrace`` runs the CLI."""

from tdxtrace._entry import run

run()
