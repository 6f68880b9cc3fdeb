"""Processing steps on a route (issue 29, items 1 and 2): a program (``command``) or a
container image (``container``) run on a study's instances in a work folder; what it writes
re-enters the router as results of the origin study (runner.py, container.py, limits.py)."""
