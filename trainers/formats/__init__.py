"""The files Likeness writes and reads, one module per job: ``files`` (safe names and atomic
writes), ``embedding`` (textual-inversion embeddings), ``unet_names`` (diffusers <-> LDM UNet
names), ``layer_names`` (LoRA layer names and kohya keys), ``kohya_lora`` (LoRA files),
``metadata`` (what every file says about itself).  ``docs/FORMATS.md`` describes the files."""
