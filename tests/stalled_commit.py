"""`python -m tests.stalled_commit ARGS`: `python -m sasa_jax.main ARGS`, except that the
checkpoint of step $SASA_TEST_STALL_STEP never commits.

Its arrays are written; then orbax's commit of the step (the rename of a local temporary
directory, or commit_success.txt on object storage) writes the file $SASA_TEST_STALL_MARKER
and waits for ever instead, while training goes on until the next save waits for it. A test
kills the process there: a process that dies in the middle of saving a checkpoint, as one
that the watchdog, a failed peer or the kernel's OOM killer stops may.
"""
import os
import runpy
import time

from orbax.checkpoint._src.path import atomicity


def _stall_at(step: str, marker: str):
  def patch(cls):
    finalize = cls.finalize

    async def stalled(self, *args, **kwargs):
      if self.get_final().name == step:
        with open(marker, "w") as f:
          f.write(str(self.get()))
        while True:
          time.sleep(60)
      return await finalize(self, *args, **kwargs)
    cls.finalize = stalled
  patch(atomicity.AtomicRenameTemporaryPath)  # local file systems
  patch(atomicity.CommitFileTemporaryPath)  # object storage


if __name__ == "__main__":
  _stall_at(os.environ["SASA_TEST_STALL_STEP"], os.environ["SASA_TEST_STALL_MARKER"])
  runpy.run_module("sasa_jax.main", run_name="__main__", alter_sys=True)
