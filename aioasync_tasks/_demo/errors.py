"""``DemoFailed``: why the demo could not run, or went wrong."""


class DemoFailed(Exception):
    """The demo could not run, or went wrong; the message says why in one line."""
