.PHONY: setup demo test test-fast
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/ltd demo
# the full suite, end-to-end tests on the embedded model included
test: setup
	.venv/bin/python -m pytest -q
# the edit-test loop: everything but the tests that load a real model (@pytest.mark.e2e)
test-fast:
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m "not e2e"
