"""The demo grid's layout (issue 25): rows of at most COLUMNS cells, inputs in cells of their own, the
structure row's strengths, and the inpainting box that covers its shape on the token grid."""

from __future__ import annotations

import numpy as np

from diffsynth_templates.toy import demo
from diffsynth_templates.toy import world as toy_world


def scenes():
    found = toy_world.fixed_eval_prompts(demo.FOREIGN + 1)
    return found[demo.SCENE], found[demo.FOREIGN]


def test_rows_fit_the_grid_and_show_inputs_as_cells():
    (prompt, scene), (_, other) = scenes()
    rows = demo.demo_rows(prompt, scene, other)
    assert [r.needs[0] for r in rows] == ["brightness", "color", "structure", "inpaint", "super_resolution",
                                          "sharpness", "structure"]  # fmt: skip
    for row in rows:
        assert 2 <= len(row.tiles) <= demo.COLUMNS, row.title
        for tile in row.tiles:  # a cell is either generated or a picture shown as such
            assert (tile.picture is None) or (tile.inputs is None), tile.label
    structure = rows[2].tiles
    assert structure[0].picture is not None and structure[1].inputs is None  # the map, then the base
    assert [t.inputs[0]["strength"] for t in structure[2:]] == list(demo.STRENGTHS)
    # the map is another scene's: it does not overlap the prompt's own shapes
    own = toy_world.render(scene).mask > 127
    assert not (np.asarray(structure[0].picture.convert("L")) > 127)[own].any()


def test_the_inpainting_box_covers_the_shape_on_the_token_grid():
    (_, scene), _ = scenes()
    shape = toy_world.render(scene).shape_masks[-1] > 127
    box = demo.box_around(shape)
    assert box[shape].all() and box.sum() < 0.5 * box.size
    ys, xs = np.nonzero(box)
    assert ys.min() % 8 == 0 and xs.min() % 8 == 0 and (ys.max() + 1) % 8 == 0 and (xs.max() + 1) % 8 == 0


def test_the_grid_is_columns_wide_and_a_row_per_template():
    (prompt, scene), (_, other) = scenes()
    rows = demo.demo_rows(prompt, scene, other)[:2]
    blank = toy_world.render(scene).image
    grid = demo.render_grid("title", [(r, [blank] * len(r.tiles)) for r in rows])
    assert grid.width == demo.COLUMNS * demo.CELL
    assert grid.height == demo.TITLE + 2 * (demo.HEADER + demo.CELL + demo.LABEL)
