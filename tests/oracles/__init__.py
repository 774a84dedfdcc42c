"""The loaders our files must satisfy, as test oracles, so the tests run without the UIs installed:
ComfyUI's and AUTOMATIC1111's LoRA and embedding handling re-implemented from their source
(``comfy_lora``, ``a1111_lora``, ``comfy_embedding``, ``a1111_embedding``; ``comfy_source`` runs
ComfyUI's own functions from a checkout to check the mirrors), diffusers' real LoRA conversion
(``diffusers_lora``), and the real architectures they are applied to (``architectures``)."""
