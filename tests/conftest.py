"""Shared pytest setup: deterministic, single-threaded-friendly CPU runs."""
import os

os.environ.setdefault("MINDSPEED_VITA_BACKEND", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
