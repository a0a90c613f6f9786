"""The engine wing: one thread that owns the model and batches every request per decoding step.

Imports only from the model wing below it (api → frontend → engine → model).
"""
