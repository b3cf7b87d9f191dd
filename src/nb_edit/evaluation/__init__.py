"""Evaluation: the harness (any editor on any benchmark), statistics,
the paper-claims table and the run report.
"""
