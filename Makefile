.PHONY: setup demo test test-fast
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/ltd demo
# the full suite, end-to-end tests on the embedded model included, on two processes of
# one torch thread each (5 min on 2 cores, AMD EPYC AVX2, 2026-12-03; one process of two threads took 6)
test: setup
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -n 2 --dist worksteal
# the edit-test loop: everything but the tests that load a real model (e2e) and the few
# statistical and whole-pipeline tests that take tens of seconds each (slow), on two
# processes of one torch thread each
test-fast:
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -n 2 -m "not e2e and not slow"
