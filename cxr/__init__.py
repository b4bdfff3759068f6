"""The library of the chest X-ray retrieval programs at the repository's top level (train.py,
test.py, explain.py, retrieve.py, ...): one topic per module, listed in README.md (Files).
Programs import it; it never imports a program."""
