"""Notebook helpers: figures (``viz``) and the ipywidgets editor (``widgets``).
"""
