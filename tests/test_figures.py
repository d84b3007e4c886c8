"""Figures are written like run files: whole or not at all, never through a link."""

import pytest

from moelab.figures import pyplot, save


def _figure():
    fig, ax = pyplot().subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    return fig


def test_save_writes_a_png_and_leaves_no_temporary(tmp_path):
    path = save(_figure(), tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]


def test_a_link_at_the_name_is_replaced_and_its_target_untouched(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / "curve.png").symlink_to(outside)
    save(_figure(), run / "curve.png")
    assert outside.read_text() == "keep me"
    assert not (run / "curve.png").is_symlink() and (run / "curve.png").stat().st_size > 100


def test_a_failed_draw_leaves_the_previous_figure(tmp_path):
    path = save(_figure(), tmp_path / "curve.png")
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save(_figure(), path, dpi="not a number")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]
