"""The three papers, one folder each (``npedit``, ``multireward``, ``mtrl``), and ``registry``: the
one owner of a trained run (its configuration, variants, step defaults and cache key).
"""
