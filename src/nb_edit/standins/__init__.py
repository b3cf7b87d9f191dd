"""What ``make pretrain`` makes: the tiny stand-ins for hub models (teacher, supervised editors,
judge), trained on ShapesWorld and shipped in ``data/pretrained/``.
"""
