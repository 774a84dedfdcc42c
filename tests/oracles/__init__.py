"""The loaders our files must satisfy, as test oracles: ComfyUI's and AUTOMATIC1111's LoRA key
handling re-implemented from their source (``comfy_lora``, ``a1111_lora``; ``comfy_source`` runs
ComfyUI's own functions from a checkout to check the mirror), diffusers' real conversion
(``diffusers_lora``), and the real architectures they are applied to (``architectures``).  The
tests import them from here so that the UIs need not be installed."""
