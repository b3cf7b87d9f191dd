"""The VLM judge: the model wrapper (``judge``), differentiable preprocessing (``preprocess``),
the question templates (``questions``) and answer parsing (``parsing``).
"""
