"""python -m tests.gc_probe MODULE ARGS: runs MODULE as `python -m MODULE ARGS` does and
prints, as the process exits, whether Python's garbage collector is on."""
import atexit
import gc
import runpy
import sys

atexit.register(lambda: print(f"garbage collector on at exit: {gc.isenabled()}", flush=True))
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
