"""The toy world: the small embedded default that ``python infer.py`` runs with no arguments.

- ``world``: the procedural dataset (vocabulary, scene specs, rendering, measurements, the generator;
  ``python -m diffsynth_templates.toy.world --out datasets/toy``).
- ``configs``: the toy models' shapes and generation defaults (DiT, VAE, text encoder, tokenizer words).
- ``models``: the shipped base model and templates loaded together (``ToyWorld``), as the demo and the
  controllability evaluation use them.
- ``metrics``: the image measurements the evaluation reports.
- ``demo``: the labelled demo grid (``render_demo``; ``python -m diffsynth_templates.toy.demo``).

Layer: beside ``infer.py``; it may import pipelines, templates and loading, and nothing in the library
imports it. Training recipes and evaluation runs stay tools under ``scripts/``.
"""
