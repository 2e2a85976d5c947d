"""Helpers and scripts for the multi-process tests (tests/test_parallel_*.py): `multiprocess.py`
runs a function on N local ranks; the other files are scripts that the tests start through real
launchers (mpirun, deepspeed) or as plain processes."""
