"""Metrics and their uncertainty, shared by the consumers (evaluation, MedSigLIP probes, later fine-tuning).

``functions``: registered metric functions computed from per-item :class:`~medlens.metrics.functions.Parts`;
``stats``: bootstrap intervals, paired differences, McNemar's exact test, items needed.
"""
