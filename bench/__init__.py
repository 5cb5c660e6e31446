"""The performance suite: ``make bench`` (``python -m bench``), not part of ``make test``.

Each module exposes ``run(ctx) -> list[Figure]``; the runner writes ``bench/results.json`` and
``bench/results.md``. Every figure names its unit, the machine (cores) and the command that reproduces it.
Ratios are measured within one run, so they compare like with like on a shared machine.
"""
