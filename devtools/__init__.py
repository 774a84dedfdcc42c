"""Tools for the people who build Likeness, not for its users: run from a checkout (the repository
root on ``sys.path``, ``likeness`` installed or on ``PYTHONPATH``); never installed with the package."""
