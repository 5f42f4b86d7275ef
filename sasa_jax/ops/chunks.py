"""Running a batched function over sequential slices of the batch, to bound peak memory."""
import jax


def fewest_chunks(batch: int, per_example: int, limit: int) -> int:
  """The fewest chunks (a divisor of `batch`) holding at most `limit` units each, given
  `per_example` units per example; `batch` (one example per chunk) if none fits."""
  for chunks in range(1, batch + 1):
    if batch % chunks == 0 and per_example * (batch // chunks) <= limit:
      return chunks
  return batch


def map_batch_chunks(fn, args, chunks: int, remat: bool = False):
  """fn(*args) with every array of `args` (leading dim = batch; None passes through) cut into
  `chunks` slices run one after another by lax.map; remat recomputes each slice's forward in
  the backward pass instead of storing its intermediates. Outputs are re-joined."""
  if chunks == 1:
    return fn(*args)
  split = lambda x: None if x is None else x.reshape((chunks, x.shape[0] // chunks) + x.shape[1:])
  body = jax.checkpoint(fn) if remat else fn
  out = jax.lax.map(lambda a: body(*a), tuple(split(a) for a in args))
  return jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:]), out)
