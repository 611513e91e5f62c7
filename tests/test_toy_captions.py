"""Captions that do not describe the layout (issue 25): the toy world's prompts for training a
structure control that must win over the prompt."""

from __future__ import annotations

import numpy as np

from diffsynth_templates.toy import world

POSITION_WORDS = {"top", "middle", "bottom", "left", "right", "center"}


def test_the_default_caption_is_unchanged():
    _, spec = world.fixed_eval_prompts(1)[0]
    assert world.caption(spec) == (
        "a medium yellow circle at the bottom right and a medium blue ring at the top left on a red background"
    )


def test_caption_without_layout_names_everything_but_positions():
    for _, spec in world.fixed_eval_prompts(16):
        text = world.caption_without_layout(spec)
        assert not POSITION_WORDS & set(text.split()), text
        for shape in spec.shapes:
            assert f"a {shape.size} {shape.color} {shape.kind}" in text
        assert text.endswith(world.caption(spec).split(" on ", 1)[1])  # the same background


def test_misplaced_caption_moves_every_shape_to_another_free_cell():
    for i, (_, spec) in enumerate(world.fixed_eval_prompts(16)):
        rng = np.random.default_rng(i)
        text = world.misplaced_caption(spec, rng)
        assert text == world.misplaced_caption(spec, np.random.default_rng(i))  # reproducible
        phrases = text.split(" on ", 1)[0].split(" and ")
        moved = [p.split(" at the ", 1)[1] for p in phrases]
        assert len(moved) == len(spec.shapes) and len(set(moved)) == len(moved)
        assert all(m != s.position and m in world.POSITIONS for m, s in zip(moved, spec.shapes))
