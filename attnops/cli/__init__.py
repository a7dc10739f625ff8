"""Command-line programs above the library layers (``python -m attnops.maps`` runs ``cli.maps``)."""
