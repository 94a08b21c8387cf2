"""``medlens batch``: a manifest of studies or questions -> one result envelope per row, locally or on Ray."""
