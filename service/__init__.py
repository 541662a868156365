"""The service core that the API (app/) and the worker (worker/) share: settings, the job store,
the queue, the job spec's training arguments and process helpers.

Imports flow one way: app/ and worker/ import this package and never each other; this package
imports only `al` and third-party packages.
"""
