"""Core: paths, configuration (one home per profile), run folders and metrics, the artifact cache,
images, input validation and the runtime (seeds, devices, threads). Imports nothing above it.
"""
