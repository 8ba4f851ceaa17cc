"""`infmllm_gguf.layout`: positions from advances, M-RoPE images found and kept whole (pure NumPy)."""
import numpy as np

from infmllm_gguf.layout import image_groups, image_layout, keep_images_whole, positions

# text, text, an image of 4 cells spanning 3 positions, text, an image of 2 cells spanning 2, text
ADVANCE = np.array([1, 1, 0, 0, 0, 3, 1, 0, 2, 1])


def test_positions_share_an_images_time_position_and_skip_its_span():
    assert positions(ADVANCE).tolist() == [0, 1, 2, 2, 2, 2, 5, 6, 6, 8]
    assert positions(np.ones(4, dtype=np.int64)).tolist() == [0, 1, 2, 3]
    assert positions(np.zeros(0, dtype=np.int64)).tolist() == []


def test_image_groups_are_the_runs_that_share_a_position():
    assert image_groups(ADVANCE) == [(2, 6), (7, 9)]
    assert image_groups(np.ones(3, dtype=np.int64)) == []


def test_an_image_layout_moves_three_axes_and_not_the_fourth():
    offsets = np.array([[0, 0], [0, 1], [0, 0], [5, 5]])
    assert image_layout(offsets, 10).tolist() == [[10, 10], [10, 11], [10, 10], [5, 5]]


def test_images_are_kept_or_dropped_whole_within_the_budget():
    keep = np.array([1, 0, 1, 1, 1, 0, 1, 0, 1, 1], dtype=bool)  # image 1: 3 of 4 kept, image 2: 1 of 2
    out = keep_images_whole(keep, ADVANCE, budget=7)
    # image 1 completed (3/4 kept, room left by image 2 dropped); image 2 (half kept) also completable
    # but image 1 took the room: 7 cells
    assert out.tolist() == [1, 0, 1, 1, 1, 1, 1, 0, 0, 1]
    assert np.count_nonzero(out) <= 7
    for a, b in image_groups(ADVANCE):
        assert out[a:b].all() or not out[a:b].any()
    # too little of it kept: dropped whole, even with room
    keep = np.array([1, 1, 1, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
    assert keep_images_whole(keep, ADVANCE, budget=10)[2:6].tolist() == [False] * 4
    # a selection that keeps whole images only is returned as it is
    keep = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 1], dtype=bool)
    assert keep_images_whole(keep, ADVANCE, budget=7).tolist() == keep.tolist()
