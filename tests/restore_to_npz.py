"""`python -m tests.restore_to_npz WORKDIR OUT`: the last checkpoint's step and parameters of
WORKDIR (a local path or gs://) saved as OUT (.npz), for tests that read a checkpoint with
another process's environment."""
import sys

import numpy as np

from tests.helpers import restore_params

if __name__ == "__main__":
  step, params = restore_params(sys.argv[1])
  np.savez(sys.argv[2], step=step, **params)
