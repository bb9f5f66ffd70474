"""sftlab: supervised fine-tuning with exact labels, data checks and honest reports."""

__version__ = "0.1.0"
