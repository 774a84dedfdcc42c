"""The shapes world: a procedural testbed and the small text-to-image model trained on it.

render.py      Scene, render(scene), caption(scene), parse_caption(text), sample_scene(rng, split)
model.py       the base model's architecture and ``load_pipeline()`` (world/base_model, diffusers)
train_base.py  the reproducible training script of world/base_model
classifier.py  the attribute classifier (world/classifier.safetensors): predict, features
metrics.py     concept fidelity, feature similarity, prompt fidelity, diversity

(No names are re-exported here, so ``likeness.world.render`` stays the module.)
"""
