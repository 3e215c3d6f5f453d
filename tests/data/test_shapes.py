import numpy as np

from ditpipe.data.shapes import COLORS, RELATIONS, SIZES, generate, render, sample_scene


def test_deterministic_from_seed_and_index():
    a = [(k, np.asarray(i).tobytes(), c) for k, i, c, _ in generate(3, 20, 32)]
    b = [(k, np.asarray(i).tobytes(), c) for k, i, c, _ in generate(3, 20, 32)]
    assert a == b
    assert a != [(k, np.asarray(i).tobytes(), c) for k, i, c, _ in generate(4, 20, 32)]


def test_captions_name_the_attributes_and_relation():
    scenes = [sample_scene(0, i) for i in range(300)]
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert {s.relation for s in scenes if s.relation} == set(RELATIONS)
    for s in scenes:
        cap = s.caption()
        for o in s.objects:
            assert f"a {o.size} {o.color} {o.shape}" in cap
        if s.relation:
            assert s.relation in cap
            a, b = s.objects
            dx, dy = b.cx - a.cx, b.cy - a.cy
            assert {"to the left of": dx > 0, "to the right of": dx < 0, "above": dy > 0, "below": dy < 0}[s.relation]


def test_rendered_colour_is_where_the_metadata_says():
    for i in range(50):
        s = sample_scene(1, i)
        img = np.asarray(render(s, 64)).astype(int)
        o = s.objects[-1]  # the last drawn is never covered
        px = img[int(o.cy * 64), int(o.cx * 64)]
        if o.shape == "triangle":  # the centre of the box can sit outside a thin triangle's top
            px = img[int((o.cy + SIZES[o.size] / 4) * 64), int(o.cx * 64)]
        assert np.abs(px - np.array(COLORS[o.color])).max() < 40, (i, o, px)


def test_any_resolution():
    assert render(sample_scene(0, 0), 48).size == (48, 48)
