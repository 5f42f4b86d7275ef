"""Where a compiled program's time goes, per XLA operation (fusion, dot, copy, ...).

  rows = hlo_profile(jax.jit(f).lower(*args).compile(), *args, top=10)

Runs the executable under `jax.profiler.trace`, reads the trace back with
`jax.profiler.ProfileData` and sums, per HLO instruction of that program, the time of the
events the runtime recorded for it (on the CPU: one per executed thunk; inside a loop, one
per iteration; on a GPU: the device's own events, its kernels as CUPTI timed them, rather
than the host's launches of them). Control flow (while, conditional, call) is left out,
since its events contain its body's. Each row names what the instruction computes: its
result shape and, for a fusion, the operations fused into it, so that a slow product can be
told from a slow layout copy, and the JAX code it came from. Under the profiler every
operation runs a little slower; the shares, not the absolute times, are the guide.
"""
import collections
import re
import tempfile
from typing import NamedTuple

import jax
from etils import epath

# HLO opcodes whose events enclose other instructions' events.
_CONTAINERS = ("while", "conditional", "call", "async-start", "async-done")
# Opcodes that say nothing about the work inside a fused computation.
_PLUMBING = ("parameter", "bitcast", "constant", "tuple", "get-tuple-element")
# (shape, opcode, called computation, op_name) of an event's instruction missing from the HLO.
_UNKNOWN = ("?", "?", None, "")


class HloOpTime(NamedTuple):
  name: str        # the HLO instruction, e.g. "ynn_fusion.11"
  ms: float        # milliseconds per run of the program (all its executions in that run)
  calls: int       # executions per run (a loop body's instruction runs once per iteration)
  share: float     # of the summed time of all the program's instructions
  shape: str       # its result without layout, e.g. "f32[2,14,8,16,100]"
  contents: str    # opcode, or for a fusion the distinct opcodes fused into it, in order
  source: str = ""  # the JAX code it came from (its metadata op_name), e.g.
  #                   "jit(loss)/transpose(jvp())/sasa_dq_kernel/pallas_call"


def _instructions(hlo_text: str):
  """{instruction name: (result shape, opcode, called computation or None, op_name)}."""
  found = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*)$",
                       hlo_text, re.M):
    called = re.search(r"calls=%([\w.\-]+)", m.group(4))
    source = re.search(r'metadata=\{[^}]*?op_name="([^"]*)"', m.group(4))
    shape = re.sub(r"\{[^}]*\}", "", m.group(2))  # without layouts
    found[m.group(1)] = (shape, m.group(3), called.group(1) if called else None,
                         source.group(1) if source else "")
  return found


def _computation_opcodes(hlo_text: str, name: str) -> list[str]:
  m = re.search(r"^%" + re.escape(name) + r" .*?^}", hlo_text, re.M | re.S)
  if not m:
    return []
  ops = re.findall(r"= (?:\(.*?\)|\S+) ([\w\-]+)\(", m.group(0))
  return list(dict.fromkeys(op for op in ops if op not in _PLUMBING))


def _program_events(data, module: str, planes: str) -> list[tuple[str, float]]:
  """(HLO instruction, duration in ns) of each event of `module`'s instructions on `planes`
  (hlo_profile's). An event that two lines of a plane both hold (same instruction, same
  start) counts once."""
  device, host = {}, {}
  for plane in data.planes:
    found = device if plane.name.startswith("/device:") else host
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if stats.get("hlo_module") == module and "hlo_op" in stats:
          key = (plane.name, stats["hlo_op"], event.start_ns)
          found[key] = max(found.get(key, 0), event.duration_ns)
  chosen = {"device": device, "host": host, "auto": device or host}[planes]
  return [(op, ns) for (_, op, _), ns in chosen.items()]


def hlo_profile(executable, *args, runs: int = 3, top: int | None = None,
                planes: str = "auto") -> list[HloOpTime]:
  """Per-instruction time of `executable(*args)` (a `jax.stages.Compiled`), longest first.

  runs: profiled executions (after one unprofiled warm-up) that the times are averaged over;
  top: how many rows to return (None: all); planes: whose events count: "device" (the
  accelerators' own: "/device:GPU:0", ...; none on the CPU backend, or on a GPU whose
  profiler, CUPTI, recorded nothing), "host" (the CPU's: the CPU backend's thunks, a GPU's
  launches), "auto" (the devices' where they hold any, else the host's)."""
  if planes not in ("auto", "device", "host"):
    raise ValueError(f"planes={planes!r}: one of 'auto', 'device', 'host'")
  hlo_text = executable.as_text()
  module = re.match(r"HloModule ([\w.\-]+)", hlo_text).group(1)
  instructions = _instructions(hlo_text)
  jax.block_until_ready(executable(*args))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(runs):
        jax.block_until_ready(executable(*args))
    (xspace,) = epath.Path(tmp).glob("plugins/profile/*/*.xplane.pb")
    data = jax.profiler.ProfileData.from_file(str(xspace))
  total_ns, calls = collections.Counter(), collections.Counter()
  for op, duration_ns in _program_events(data, module, planes):
    if instructions.get(op, _UNKNOWN)[1] not in _CONTAINERS:
      total_ns[op] += duration_ns
      calls[op] += 1
  summed = sum(total_ns.values()) or 1
  rows = []
  for op, ns in total_ns.most_common(top):
    shape, opcode, called, source = instructions.get(op, _UNKNOWN)
    contents = " ".join(_computation_opcodes(hlo_text, called)) if called else opcode
    rows.append(HloOpTime(op, ns / runs / 1e6, calls[op] // runs, ns / summed, shape,
                          contents, source))
  return rows


def format_rows(rows: list[HloOpTime]) -> str:
  return "\n".join(f"  {r.ms:8.2f} ms {100 * r.share:5.1f}% x{r.calls:<4d} {r.name:30s} "
                   f"{r.shape:28s} {r.contents}" for r in rows)
