"""How the shapes world's base model was made and is measured (the model itself ships in
``likeness.world``):

architecture.py  the base model's configs and builders (what ``train_base`` instantiates)
train_base.py    the reproducible training script of world/base_model (see its TRAINING.md)
text_probe.py    attribute probes on the text encoder (an auxiliary loss of stage 2c)
evaluate_base.py how well the base model draws what it is asked (the BENCHMARKS.md table)

    python -m devtools.world.train_base --help      # from the repository root
"""
