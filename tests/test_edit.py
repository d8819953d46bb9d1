"""engine/edit.py: correction helpers on small hand-built label images with known answers."""
import numpy as np
import pytest

from napari_medrwkv.engine import edit


def A(rows, dtype=np.uint16):
    """A label image from strings: '.' is 0, digits are ids."""
    return np.array([[0 if ch == "." else int(ch) for ch in row] for row in rows], dtype=dtype)


# Two objects of id 1 (one diagonal-touching pair counts as one), id 2 touching id 1.
SCENE = A([
    "11......",
    "11..22..",
    "..1.22..",
    "...1.22.",
    "........",
    "......33",
])


def _unchanged_input(func, labels, *args):
    copy = labels.copy()
    out = func(labels, *args)
    assert np.array_equal(labels, copy), "the input was modified"
    assert out is not labels and out.dtype == labels.dtype and out.shape == labels.shape
    return out


# --------------------------------------------------------------------------- object_at
def test_object_at_follows_8_connectivity_of_one_value():
    mask = edit.object_at(SCENE, (0, 0))
    assert mask.dtype == bool
    assert np.array_equal(mask, SCENE == 1)              # the diagonal chain is one object
    assert np.array_equal(edit.object_at(SCENE, (3, 5)), SCENE == 2)
    assert np.array_equal(edit.object_at(SCENE, (5, 7)), SCENE == 3)   # at the border


def test_object_at_separates_pieces_of_one_id_and_background_is_empty():
    labels = A(["1.1",
                "1.1"], np.uint8)
    assert np.array_equal(edit.object_at(labels, (1, 0)), np.array([[1, 0, 0], [1, 0, 0]], bool))
    assert not edit.object_at(labels, (0, 1)).any()                    # background
    assert not edit.object_at(labels, (9, 9)).any()                    # outside the image
    assert not edit.object_at(np.zeros((0, 0), np.uint8), (0, 0)).any()


def test_object_at_accepts_float_points_and_rejects_non_2d():
    assert edit.object_at(SCENE, (0.4, 1.2)).sum() == (SCENE == 1).sum()
    with pytest.raises(ValueError):
        edit.object_at(np.zeros((2, 3, 3), np.uint8), (0, 0))
    with pytest.raises(TypeError):
        edit.object_at(np.zeros((3, 3), np.float32), (0, 0))


# --------------------------------------------------------------------------- delete / keep
def test_delete_object():
    out = _unchanged_input(edit.delete_object, SCENE, (1, 4))
    expected = SCENE.copy()
    expected[expected == 2] = 0
    assert np.array_equal(out, expected)
    assert np.array_equal(_unchanged_input(edit.delete_object, SCENE, (4, 0)), SCENE)   # background click


def test_delete_only_the_clicked_piece_of_an_id():
    labels = A(["11..1",
                "11..1"], np.uint8)
    assert np.array_equal(edit.delete_object(labels, (0, 4)), A(["11...", "11..."], np.uint8))


def test_keep_object():
    out = _unchanged_input(edit.keep_object, SCENE, (5, 6))
    assert np.array_equal(out, np.where(SCENE == 3, SCENE, 0))
    binary = A(["1..1",
                "1..1"], np.uint8)
    assert np.array_equal(edit.keep_object(binary, (1, 3)), A(["...1", "...1"], np.uint8))
    assert not edit.keep_object(binary, (0, 1)).any()                   # background: nothing kept


def test_instance_ids_above_255_survive():
    labels = np.zeros((4, 4), np.uint16)
    labels[:2, :2] = 4000
    labels[2:, 2:] = 65535
    assert np.array_equal(edit.keep_object(labels, (3, 3)), np.where(labels == 65535, labels, 0))
    assert edit.delete_object(labels, (0, 0)).max() == 65535


# --------------------------------------------------------------------------- fill_holes
def test_fill_holes_of_each_id():
    labels = A([
        "111...........",
        "1.1..2222.....",
        "111..2..2.....",
        ".....2222.....",
    ])
    expected = A([
        "111...........",
        "111..2222.....",
        "111..2222.....",
        ".....2222.....",
    ])
    assert np.array_equal(_unchanged_input(edit.fill_holes, labels), expected)


def test_fill_holes_never_overwrites_another_label_and_nests():
    labels = A([
        "1111111",
        "1.....1",
        "1.222.1",
        "1.2.2.1",
        "1.222.1",
        "1.....1",
        "1111111",
    ])
    expected = A([
        "1111111",
        "1111111",
        "1122211",
        "1122211",                                         # innermost enclosure wins the centre
        "1122211",
        "1111111",
        "1111111",
    ])
    assert np.array_equal(_unchanged_input(edit.fill_holes, labels), expected)


def test_gap_between_two_touching_ids_is_not_a_hole():
    labels = A([
        "1122",
        "1..2",
        "1122",
    ], np.uint8)
    assert np.array_equal(edit.fill_holes(labels), labels)


def test_open_regions_and_the_image_border_are_not_holes():
    c_shape = A([
        "111",
        "1..",
        "111",
    ], np.uint8)
    assert np.array_equal(edit.fill_holes(c_shape), c_shape)
    # a hole in an object that touches the border is still a hole
    at_border = A([
        "111.",
        "1.1.",
        "111.",
    ], np.uint8)
    assert edit.fill_holes(at_border)[1, 1] == 1
    # diagonal gaps do not let a hole leak out (the object is 8-connected)
    diamond = A([
        ".1.",
        "1.1",
        ".1.",
    ], np.uint8)
    assert edit.fill_holes(diamond)[1, 1] == 1


def test_fill_holes_binary_bool_and_empty():
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False
    out = _unchanged_input(edit.fill_holes, ring)
    assert out.all() and out.dtype == bool
    empty = np.zeros((4, 6), np.int32)
    assert np.array_equal(_unchanged_input(edit.fill_holes, empty), empty)


# --------------------------------------------------------------------------- remove_small
def test_remove_small_per_piece_and_id():
    labels = A([
        "111..2",
        "111...",
        "......",
        "33.4..",
        "33.44.",
    ])
    out = _unchanged_input(edit.remove_small, labels, 4)
    assert np.array_equal(out, A([
        "111...",
        "111...",
        "......",
        "33....",
        "33....",
    ]))
    # min_size is exclusive: a 4-pixel object survives min_size 4, not 5
    assert (edit.remove_small(labels, 5) == 3).sum() == 0
    assert np.array_equal(edit.remove_small(labels, 1), labels)
    assert np.array_equal(edit.remove_small(labels, 0), labels)
    with pytest.raises(ValueError):
        edit.remove_small(labels, -1)


def test_remove_small_keeps_touching_ids_apart_and_uses_8_connectivity():
    labels = A([
        "1122",
        "1.2.",
        "...3",
    ], np.uint8)
    # 1: 3 px, 2: 3 px plus a diagonal neighbour of id 3 (a different id, not joined)
    assert np.array_equal(edit.remove_small(labels, 3), A(["1122", "1.2.", "...."], np.uint8))
    diagonal = A(["1..",
                  ".1.",
                  "..1"], np.uint8)
    assert np.array_equal(edit.remove_small(diagonal, 3), diagonal)
    assert not edit.remove_small(diagonal, 4).any()


def test_remove_small_binary_and_empty():
    binary = np.zeros((6, 6), np.uint8)
    binary[0, 0] = 1
    binary[2:6, 2:6] = 1
    out = edit.remove_small(binary, 2)
    assert out[0, 0] == 0 and out[2:, 2:].all() and out.dtype == np.uint8
    assert not edit.remove_small(np.zeros((3, 3), np.uint16), 20).any()


# --------------------------------------------------------------------------- smooth
def test_smooth_radius_zero_is_identity():
    out = _unchanged_input(edit.smooth, SCENE, 0)
    assert np.array_equal(out, SCENE)
    with pytest.raises(ValueError):
        edit.smooth(SCENE, -1)


def test_smooth_removes_spurs_and_fills_notches():
    labels = np.zeros((20, 20), np.uint8)
    labels[5:15, 5:15] = 1
    labels[9, 15:19] = 1          # a one-pixel spur
    labels[5:8, 9] = 0            # a one-pixel notch into the top edge
    out = _unchanged_input(edit.smooth, labels, 1)
    assert not out[9, 16:19].any()  # the spur is gone (its root pixel is a 1-px bump a disk still covers)
    assert out[7, 9] == 1           # the notch is shallower (opening first rounds its mouth)
    assert out[8:14, 6:14].all()    # the core stays
    assert not out[:5].any() and not out[15:].any() and not out[:, 16:].any()   # nothing grew


def test_smooth_removes_objects_thinner_than_the_disk():
    labels = np.zeros((12, 12), np.uint16)
    labels[2:10, 2:10] = 7
    labels[0, 0:3] = 9            # a thin line at the border
    out = edit.smooth(labels, 2)
    assert not (out == 9).any() and (out == 7).sum() > 40


def test_smooth_never_grows_into_other_labels():
    labels = np.zeros((14, 20), np.uint16)
    labels[2:12, 2:10] = 1
    labels[2:12, 10:18] = 2       # touching neighbour
    labels[6, 2:4] = 0            # notches next to...
    labels[6, 16:18] = 0
    labels[3:11, 9] = 3           # ...and a thin different id between them
    out = edit.smooth(labels, 2)
    took = (labels != 0) & (out != 0) & (labels != out)
    assert not took.any(), "a label took pixels of another label"
    assert set(np.unique(out)) <= {0, 1, 2, 3}


def test_smooth_does_not_shave_objects_at_the_border():
    labels = np.zeros((10, 10), np.uint8)
    labels[:, :5] = 1             # a half-plane touching three edges
    out = edit.smooth(labels, 2)
    assert np.array_equal(out, labels)


def test_smooth_background_claimed_by_two_ids_stays_background():
    labels = A([
        "11111.22222",
        "11111.22222",
        "11111.22222",
        "11111.22222",
        "11111.22222",
    ], np.uint8)
    out = edit.smooth(labels, 1)
    assert (out[:, 5] == 0).all()


def test_smooth_empty_and_binary():
    assert not edit.smooth(np.zeros((5, 5), np.uint8), 3).any()
    disk = np.zeros((21, 21), np.uint8)
    yy, xx = np.mgrid[:21, :21]
    disk[(yy - 10) ** 2 + (xx - 10) ** 2 <= 49] = 1
    assert np.array_equal(edit.smooth(disk, 2), disk)     # already smooth


def _merged(before, after):
    """Objects of ``after`` (8-connected pieces of one id) that overlap more than one object of ``before``."""
    from skimage.measure import label as connected
    old = connected(np.asarray(before, np.int64), background=0, connectivity=2)
    new = connected(np.asarray(after, np.int64), background=0, connectivity=2)
    return [piece for piece in range(1, new.max() + 1) if len(set(np.unique(old[new == piece])) - {0}) > 1]


def test_smooth_never_merges_touching_binary_objects():
    # Binary labels of nuclei close together: every nucleus is 1, and a closing of the whole
    # mask bridged the gaps (187 nuclei became 153).  Each nucleus is smoothed on its own.
    labels = np.zeros((40, 100), np.uint8)
    yy, xx = np.mgrid[:40, :100]
    for cx in (10, 28, 46, 64):                                   # 1-px gaps between the disks
        labels[(yy - 20) ** 2 + (xx - cx) ** 2 <= 64] = 1
    labels[14:27, 74:88] = 1                                      # a block 1 px from the last disk
    labels[20, 74] = 0
    from skimage.measure import label as connected
    count = connected(labels, connectivity=2).max()
    for radius in (1, 2, 3, 5):
        out = _unchanged_input(edit.smooth, labels, radius)
        assert not _merged(labels, out), radius
        assert connected(out, connectivity=2).max() == count, radius


def test_smooth_does_not_close_a_notch_onto_another_piece_of_the_same_id():
    labels = A([
        "..........",
        ".1111111..",
        ".1111111..",
        ".11......1",
        ".11....111",
        ".11......1",
        ".1111111..",
        ".1111111..",
        "..........",
    ], np.uint8)
    for radius in (1, 2, 3):
        assert not _merged(labels, edit.smooth(labels, radius)), radius


def test_smooth_keeps_binary_nuclei_of_the_sample_apart():
    from conftest import SAMPLES
    from napari_medrwkv.engine.imageio import read_mask
    binary = (read_mask(SAMPLES / "nuclei_fluorescence_mask.png", 1) > 0).astype(np.uint8)
    out = edit.smooth(binary, 2)
    assert not _merged(binary, out)


# --------------------------------------------------------------------------- changed
def test_changed_gives_exactly_the_differing_pixels():
    after = edit.delete_object(SCENE, (0, 0))
    indices, values = edit.changed(SCENE, after)
    assert len(indices) == 2 and len(indices[0]) == (SCENE == 1).sum()
    assert (values == 0).all() and values.dtype == SCENE.dtype
    patched = SCENE.copy()
    patched[indices] = values
    assert np.array_equal(patched, after)
    none, values = edit.changed(SCENE, SCENE.copy())
    assert none[0].size == 0 and values.size == 0
    with pytest.raises(ValueError):
        edit.changed(SCENE, SCENE[:2])
