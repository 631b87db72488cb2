"""``python -m tdxtrace`` runs the CLI."""

from tdxtrace.cli import main

main()
