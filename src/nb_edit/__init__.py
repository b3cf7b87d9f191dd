"""nb-edit: instruction-based image editing trained from feedback.

Implements three papers on one code path:
NP-Edit (editing without pairs: VLM feedback + distribution matching),
MT-EditFlow (multi-turn RL for editing) and Multi-Reward as Condition.
"""

__version__ = "0.1.0"
