"""The frontend wing: requests in each dialect → one `prepare` → engine input → responses; no HTTP.

Imports only from the engine and model wings below it (api → frontend → engine → model).
"""
