"""The driver conformance suite (see conftest.py)."""
