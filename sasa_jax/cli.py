"""What the command-line entry points share: their flag parsing (no jax import)."""
import re
import sys

from absl import app


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, for app.run(main, flags_parser=parse_flags): a --config.FIELD flag
  that names no field of the config is a flags error in one line, with ml_collections'
  suggestion ("did you mean ..."), instead of the traceback ml_collections raises it with."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    cause = e
    while cause.args and isinstance(cause.args[0], BaseException):
      cause = cause.args[0]
    name, _, hint = str(cause.args[0] if cause.args else "").partition("\n")
    name = name.strip("'\"")
    flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                 and name in a.split("=")[0].split(".")), None)
    if flag is None:  # not a flag's field: an error of the config file's own
      raise
    suggestion = re.search(r'Did you mean "([^"]+)"', hint)
    sys.stderr.write(f"FATAL Flags parsing error: {flag}: the config has no field {name!r}"
                     f"{f'; did you mean {suggestion[1]!r}?' if suggestion else ''}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)
