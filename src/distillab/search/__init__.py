"""Search stages of multi-stage methods, run by `distillab search <config>`: DFA's aggregation-weight search."""

from distillab.search.run import search_dir, search_run

__all__ = ["search_dir", "search_run"]
