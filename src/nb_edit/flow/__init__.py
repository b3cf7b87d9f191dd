"""Flow matching: the schedule and samplers (few-step Euler, the unroll with gradient, the SDE step
with log-probability), the shared losses and the edit pipeline used for inference.
"""
