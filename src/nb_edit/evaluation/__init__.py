"""Evaluation: the harness (any editor on any benchmark, beside the copy baseline), statistics,
the paper-claims table and the run report.
"""
