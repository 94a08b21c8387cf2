"""``medlens serve``: the study-level HTTP API (FastAPI), its job store and its web page."""
