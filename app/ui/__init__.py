"""The web dashboard at /ui (routes.py): server-side pages, static scripts and a vendored charting library."""
