"""The accelerators' memory as the training loop logs it (no TensorFlow: the GPU check
imports it too)."""
from typing import Sequence

GIB = 2**30


def peak_memory(devices: Sequence) -> dict:
  """{"device_memory_peak_gib": the most any of `devices` has held at once since the process
  started, "device_memory_limit_gib": the least memory any of them offers,
  "device_memory_peak_fraction": the largest peak / limit of one device}, from each
  device's memory_stats() (GPU, TPU); {} where the backend reports none (the CPU)."""
  stats = [s for s in (d.memory_stats() for d in devices) if s and "peak_bytes_in_use" in s]
  if not stats:
    return {}
  result = {"device_memory_peak_gib": max(s["peak_bytes_in_use"] for s in stats) / GIB}
  limited = [s for s in stats if s.get("bytes_limit")]
  if limited:
    result["device_memory_limit_gib"] = min(s["bytes_limit"] for s in limited) / GIB
    result["device_memory_peak_fraction"] = max(s["peak_bytes_in_use"] / s["bytes_limit"]
                                                for s in limited)
  return result
