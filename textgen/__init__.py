"""textgen: a text-generation service on CPU with BentoML; the library behind service.py."""

__version__ = "0.3.0"
