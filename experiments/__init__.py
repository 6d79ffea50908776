"""The studies users run with fsq (``python -m experiments``)."""
