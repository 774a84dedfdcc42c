"""Likeness on the model a Stable Diffusion WebUI has loaded: the Forge host (``forge.py``: the whole
seam on ``shared.sd_model.forge_objects``) and what WebUI hosts share (``common.py``: training
through inference-tensor weights without touching them).

``forge.py`` imports Forge's ``backend`` and is importable only inside Forge (or a process that put a
Forge checkout on ``sys.path``, as ``tests/support/forge_runtime.py`` does); ``common.py`` needs only
torch.
"""
