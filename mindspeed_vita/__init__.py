"""mindspeed-vita: Long-VITA-style long-context VLM training and inference."""
__version__ = "0.1.0"
