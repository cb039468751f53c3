"""Framework adapters for otloss, importable as ``otloss.integrations``.

Each adapter imports its framework lazily and raises a friendly ``ImportError``
naming the extra to install when it is missing.
"""
