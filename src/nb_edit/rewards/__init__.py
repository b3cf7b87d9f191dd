"""The judge as a reward: NP-Edit's yes/no loss and the formulas of digit scores, aggregation and
fusion (``formulas``); single-turn rewards, multi-perspective scores and failure texts
(``single_turn``); MT-EditFlow's per-turn IF / CC (``multiturn``).
"""
