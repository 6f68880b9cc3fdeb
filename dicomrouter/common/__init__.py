"""What several subsystems share about the outside world, with no policy of its own: secrets
named by environment variable or file, the HTTP session and its one-line errors, the S3 client.
A leaf: imports nothing of the router but ``values``-level helpers.
"""
