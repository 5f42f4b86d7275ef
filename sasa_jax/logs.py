"""Logging set-up shared by the command-line entry points."""
import logging

from absl import logging as absl_logging


class _QuietOrbax(logging.Filter):
  """Orbax logs every checkpoint phase at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def quiet_orbax() -> None:
  absl_logging.get_absl_handler().addFilter(_QuietOrbax())
