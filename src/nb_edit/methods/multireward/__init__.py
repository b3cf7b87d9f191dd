"""Multi-Reward as Condition: VLM scores fed to the editor as a condition. See README.md here.
"""
