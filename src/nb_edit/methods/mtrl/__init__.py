"""MT-EditFlow: multi-turn RL for editing (Flow-GRPO, DiffusionNFT). See README.md here.
"""
