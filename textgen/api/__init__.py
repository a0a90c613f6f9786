"""The api wing: HTTP only (routes, BentoML IO, guards, OpenAPI, health, metrics).

The top of the house: it may import every wing below it (api → frontend → engine → model).
"""
