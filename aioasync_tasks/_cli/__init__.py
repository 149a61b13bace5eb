"""The command line, ``aioasync-tasks`` (also ``python -m aioasync_tasks``), built on click;
its entry point is ``app.main``.

``app`` holds the command group, its global options and ``main``; ``worker``, ``tasks``,
``groups``, ``nodes`` and ``demo`` the commands; ``client`` the one way they reach the
database; ``output`` how they print — plain text tables, or JSON with ``--json``.

This package imports nothing here, so that ``output`` can be used (by the demo) without the
commands.
"""
