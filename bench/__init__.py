"""Benchmarks for bgtransfer, run from the repository root: all of them with ``python -m bench``
(``__main__.py``), or each as a module (``python -m bench.download``)."""
