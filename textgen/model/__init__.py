"""The model wing: loading, the model store, weight formats (quantize), attention, and the CPU it runs on.

The bottom of the house: it imports from no wing above it (api → frontend → engine → model).
"""
