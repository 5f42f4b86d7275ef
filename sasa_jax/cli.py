"""What the command-line entry points share: their flag parsing (no jax import)."""
import re
import sys
import textwrap

import ml_collections
from absl import flags
from ml_collections import config_flags

WHILST = ": Error whilst parsing config file:"  # ml_collections' wording, traceback after it
ERROR_STATUS = 1  # the exit status of a flags error (absl's); tools/preflight sets its own


def _no_field(error: Exception, argv: list[str]) -> str | None:
  """"--config.X: the config has no field 'X'; did you mean 'Y'?" for ml_collections'
  KeyError/AttributeError about a --config.X flag; None for any other error."""
  cause = error
  while cause.args and isinstance(cause.args[0], BaseException):
    cause = cause.args[0]
  name, _, hint = str(cause.args[0] if cause.args else "").partition("\n")
  name = name.strip("'\"")
  flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
               and name in a.split("=")[0].split(".")), None)
  if flag is None:
    return None
  suggestion = re.search(r'Did you mean "([^"]+)"', hint)
  return (f"{flag}: the config has no field {name!r}"
          + (f"; did you mean {suggestion[1]!r}?" if suggestion else ""))


def _without_traceback(message: str) -> str:
  """A config file's ValueError (a bad config-string argument: base_config.apply_arg) as
  its flag and its own line; other errors, a fork's bug say, keep their traceback."""
  head, whilst, rest = message.partition(WHILST)
  last = rest.strip().splitlines()[-1].strip() if whilst and rest.strip() else ""
  return f"{head}: {last[len('ValueError: '):]}" if last.startswith("ValueError: ") else message


def _fail(message: str):
  """As absl's app.parse_flags_with_usage says a flags error, then exits with
  ERROR_STATUS."""
  sys.stderr.write(f"FATAL Flags parsing error:\n{textwrap.indent(message, '  ')}\n"
                   if "\n" in message else f"FATAL Flags parsing error: {message}\n")
  sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
  sys.exit(ERROR_STATUS)


def _fail_if_no_field(error: Exception, argv: list[str]):
  """Inside an `except`: a flags error for a --config.X flag naming no field; anything else
  (an error of the config file's own) raised again."""
  message = _no_field(error, argv)
  if message is None:
    raise error
  _fail(message)


def define_config(default: str | None = None, help_text: str = "Training config file.",
                  lock_config: bool = True):
  """--config=configs/X.py[:ARGS] and its --config.FIELD overrides (ml_collections), their
  errors as parse_flags says them: ml_collections applies the overrides to a default config
  file when the flag is defined, at import."""
  try:
    config_flags.DEFINE_config_file("config", default, help_text, lock_config=lock_config)
  except (AttributeError, KeyError) as e:
    _fail_if_no_field(e, sys.argv)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, for app.run(main, flags_parser=parse_flags), with config errors
  in one line: a bad config-string argument (`configs/X.py:kernal_size=5`) as its message
  alone, and a --config.FIELD flag that names no field with ml_collections' suggestion
  ("did you mean ...") in place of the traceback ml_collections raises it with; a config
  file that does not load (a wrong path) before anything starts."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(_without_traceback(str(e)))
  except (AttributeError, KeyError) as e:
    _fail_if_no_field(e, argv)
  # A config file that does not load is no parse error to ml_collections: it stands in a
  # value that raises at first use, after start-up and the heavy imports.
  config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
  if config is not None and not isinstance(config, ml_collections.ConfigDict):
    try:
      config.get("task")
    except OSError as e:
      _fail(f"--config: {e.__cause__ or e}")
  return rest
