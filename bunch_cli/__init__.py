"""`bunch`: Bunch's command-line client (submit, watch, download, manage jobs)."""

__version__ = "0.1.0"
