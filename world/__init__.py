"""The shapes world: a procedural testbed and the small text-to-image model trained on it.

render.py      Scene, render(scene), caption(scene), parse_caption(text), sample_scene(rng, split)
model.py       the shipped base model: BASE_MODEL_DIR, RESOLUTION, ``load_pipeline()`` (diffusers)
classifier.py  the attribute classifier (world/classifier.safetensors): predict, features
metrics.py     concept fidelity, feature similarity, prompt fidelity, diversity
text_tower.py  the classifier embedding's text tower (CLIP-T in the world): a prompt -> its renders' mean
best_step.py   best step in the world (`bench/best_step.py`): the pick against the classifier
quality*.py    the quality benchmark (`likeness bench quality`) and its method rows

Only the demo and the benchmark import it, lazily: the nodes and `likeness --help` never do.  How
the base model and the classifier were trained and evaluated lives outside the package, in the
repository's devtools/world/.

(No names are re-exported here, so ``likeness.world.render`` stays the module.)
"""
