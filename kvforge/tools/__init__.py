"""The tools layer: the ``kvforge`` command line and everything it drives.

:mod:`~kvforge.tools.cli` (entry point), :mod:`~kvforge.tools.plan`,
:mod:`~kvforge.tools.simulate`, :mod:`~kvforge.tools.workload`,
:mod:`~kvforge.tools.plot`, :mod:`~kvforge.tools.metrics`,
:mod:`~kvforge.tools.demo`, :mod:`~kvforge.tools.generate`, and the shared
table, progress and error-line output (:mod:`~kvforge.tools.output`) and
checks of command-line values (:mod:`~kvforge.tools.checks`). Tools may import
every layer; nothing below imports them.
"""
