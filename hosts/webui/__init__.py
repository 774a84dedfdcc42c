"""Likeness on the model a Stable Diffusion WebUI has loaded: the Forge host (``forge.py``: the whole
seam on ``shared.sd_model.forge_objects``), the AUTOMATIC1111 host (``a1111.py``: the seam on its
hijacked LDM ``shared.sd_model``) and what WebUI hosts share (``common.py``: training through
weights without touching them).

``forge.py`` imports Forge's ``backend`` and ``a1111.py`` A1111's ``modules`` and ``k_diffusion``:
each is importable only inside its WebUI (or a process that put its checkout on ``sys.path``, as
``tests/support/forge_runtime.py`` / ``a1111_runtime.py`` do); ``common.py`` needs only torch.
"""
