"""Config strings: get_config("depth=50,variant=full_attention") -> typed fields."""


def _convert(key, text, default):
  if isinstance(default, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"config argument {key}={text!r}: expected true or false")
    return text.lower() in ("true", "1")
  if isinstance(default, tuple):  # attention groups: "2-3-4", or "none" for ()
    return () if text.lower() in ("", "none") else tuple(int(t) for t in text.split("-"))
  if default is None or isinstance(default, str):
    return text
  try:
    return type(default)(text)
  except ValueError:
    raise ValueError(f"config argument {key}={text!r}: expected {type(default).__name__}") from None


def parse_arg(arg: str | None, **defaults) -> dict:
  """Parses "a=1,b=x" against `defaults` (which give the allowed keys and their types)."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"config argument {item!r}: expected key=value")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is not allowed; choose among {sorted(defaults)}")
    values[key] = _convert(key, text, defaults[key])
  return values
