"""The tools layer: the ``kvforge`` command line and everything it drives.

:mod:`~kvforge.tools.cli` (entry point), :mod:`~kvforge.tools.plan`,
:mod:`~kvforge.tools.simulate`, :mod:`~kvforge.tools.workload`,
:mod:`~kvforge.tools.plot`, :mod:`~kvforge.tools.metrics`,
:mod:`~kvforge.tools.demo`, :mod:`~kvforge.tools.generate`, and the shared
table, progress and error-line output (:mod:`~kvforge.tools.output`),
checks of command-line values (:mod:`~kvforge.tools.checks`), the optional
dependencies and the extras that bring them (:mod:`~kvforge.tools.extras`)
and what every parser shares without importing torch
(:mod:`~kvforge.tools.args`). Tools may import every layer; nothing below
imports them. The modules that register subcommands import torch, the engine
and matplotlib only inside the command functions, so ``kvforge --help``
needs none of them.
"""
