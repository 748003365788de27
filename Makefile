.PHONY: setup demo test
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/ltd demo
test: setup
	.venv/bin/python -m pytest -q
