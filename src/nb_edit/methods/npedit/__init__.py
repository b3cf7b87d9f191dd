"""NP-Edit: an editor trained without editing pairs. See README.md in this folder.
"""
