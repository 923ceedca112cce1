# Shortcuts for the scripts in scripts/ (each also runs on its own with bash).
.PHONY: setup book test clean-book

setup:  ## create .venv and install the package with its test and book extras
	bash scripts/setup.sh

book:   ## execute every notebook (preset quick) and build kdbook/_build/html
	bash scripts/book.sh

test:   ## set up, then run the whole test suite
	bash scripts/test.sh

clean-book:  ## remove the built book and the executed notebooks
	rm -rf kdbook/_build kdbook/lessons
