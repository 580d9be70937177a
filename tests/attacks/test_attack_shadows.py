"""Shadow models: the balanced IN/OUT design, seeded training, cached logits, and safetensors persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rayforge.attacks import MIRROR, PLAIN, Population, Query, ShadowSet, balanced_in_mask, model_logits, train_shadow
from rayforge.attacks.views import shift_images
from rayforge.config import TrainConfig
from rayforge.errors import MalformedArtifact, RayforgeError


def test_in_mask_every_point_in_exactly_half():
    mask = balanced_in_mask(8, 500, seed=3)
    assert mask.shape == (8, 500) and mask.dtype == bool
    assert np.all(mask.sum(axis=0) == 4)
    assert np.all(np.abs(mask.sum(axis=1) - 250) < 60)  # each shadow gets about half the points
    assert np.array_equal(mask, balanced_in_mask(8, 500, seed=3))
    assert not np.array_equal(mask, balanced_in_mask(8, 500, seed=4))
    # assignments are not the same pattern for every point
    assert len({tuple(col) for col in mask.T}) > 30
    with pytest.raises(RayforgeError):
        balanced_in_mask(5, 10, seed=0)


def test_shadow_set_layout(world):
    sh, pop = world.shadows, world.pop
    assert sh.k == 8 and sh.in_mask.shape == (8, len(pop))
    assert np.all(sh.in_mask.sum(axis=0) == 4)
    for query in (PLAIN, MIRROR):
        logits = sh.all_logits(query)
        assert logits.shape == (8, len(pop), 10) and logits.dtype == np.float32
        assert not logits.flags.writeable
    # the cache holds exactly what the rebuilt model computes
    np.testing.assert_array_equal(sh.logits(3, MIRROR), model_logits(sh.model(3), pop, query=MIRROR))
    np.testing.assert_array_equal(sh.logits(0), model_logits(sh.model(0), pop))
    # a shadow fits its own members better than its non-members (it trained on them)
    from rayforge.attacks.signals import log_prob_label
    lp = log_prob_label(sh.logits(0), pop.labels)
    assert lp[sh.in_mask[0]].mean() > lp[~sh.in_mask[0]].mean()


def test_train_shadow_is_seeded_and_leaves_global_rng_alone(world):
    pop = world.pop
    cfg = TrainConfig(epochs=2, batch_size=10, lr=0.1)
    ids = np.arange(20)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = train_shadow(pop, ids, "logreg", cfg, seed=7)
    after = torch.rand(1)
    assert torch.equal(before, after)  # shadow init drew from a forked RNG
    b = train_shadow(pop, ids, "logreg", cfg, seed=7)
    c = train_shadow(pop, ids, "logreg", cfg, seed=8)
    for (_, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, pc)
    assert not a.training  # handed back ready for inference


def test_save_load_round_trip(world, tmp_path):
    sh, pop = world.shadows, world.pop
    sh.ensure([Query(True, 1, -1)])
    sh.save(tmp_path / "sh")
    files = {p.name for p in (tmp_path / "sh").iterdir()}
    assert files == {"logits.safetensors", "shadows.json"} | {f"shadow-{k:02d}.safetensors" for k in range(8)}
    meta = json.loads((tmp_path / "sh" / "shadows.json").read_text())
    assert meta["k"] == 8 and meta["model"] == "logreg" and len(meta["in_mask"]) == 8
    loaded = ShadowSet.load(tmp_path / "sh", pop)
    assert np.array_equal(loaded.in_mask, sh.in_mask)
    for query in (PLAIN, MIRROR, Query(True, 1, -1)):  # the shifted view was cached by MIDA's tests or now
        np.testing.assert_array_equal(loaded.all_logits(query), sh.all_logits(query))
    for s1, s2 in zip(loaded.states, sh.states):
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    np.testing.assert_array_equal(model_logits(loaded.model(5), pop), sh.logits(5))


def test_load_refuses_other_population_and_corrupt_files(world, tmp_path):
    sh, pop = world.shadows, world.pop
    sh.save(tmp_path / "sh")
    other = Population(pop.images, pop.mean, pop.std, flip=not pop.flip)  # same pixels, other training recipe
    with pytest.raises(RayforgeError, match="different population"):
        ShadowSet.load(tmp_path / "sh", other)
    (tmp_path / "sh" / "shadow-03.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MalformedArtifact):
        ShadowSet.load(tmp_path / "sh", pop)
    with pytest.raises(MalformedArtifact):
        ShadowSet.load(tmp_path / "nothing", pop)
    meta = json.loads((tmp_path / "sh" / "shadows.json").read_text())
    meta["in_mask"][0] = meta["in_mask"][0][:-1]
    (tmp_path / "sh" / "shadows.json").write_text(json.dumps(meta))
    with pytest.raises(MalformedArtifact):
        ShadowSet.load(tmp_path / "sh", pop)


def test_other_views_are_computed_once_and_cached(world):
    sh, pop = world.shadows, world.pop
    q = Query(False, -1, 1)
    first = sh.all_logits(q)
    assert sh.all_logits(q) is first  # cached, not recomputed
    np.testing.assert_array_equal(first[2], model_logits(sh.model(2), pop, query=q))
    assert not np.array_equal(first, sh.all_logits(PLAIN))


def test_without_leaves_out_one_shadow(world):
    sh = world.shadows
    others = sh.without(2)
    assert others.k == sh.k - 1 and others.pop is sh.pop
    keep = [0, 1, 3, 4, 5, 6, 7]
    np.testing.assert_array_equal(others.in_mask, sh.in_mask[keep])
    np.testing.assert_array_equal(others.all_logits(MIRROR), sh.all_logits(MIRROR)[keep])
    assert all(a is b for a, b in zip(others.states, [sh.states[k] for k in keep]))


def test_shift_images_moves_pixels_and_fills_the_border():
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)
    fill = torch.tensor([-9.0])
    down_left = shift_images(x, 1, -1, fill)  # one row down, one column left
    assert torch.equal(down_left[:, :, 1:, :3], x[:, :, :2, 1:])
    assert (down_left[:, :, 0, :] == -9).all() and (down_left[:, :, :, 3] == -9).all()
    assert shift_images(x, 0, 0, fill) is x
    assert (shift_images(x, 3, 0, fill) == -9).all()  # moved out entirely


def test_query_keys_round_trip():
    for q in (PLAIN, MIRROR, Query(True, -2, 3)):
        assert Query.from_key(q.key) == q
    assert PLAIN.key == "f0_y+0_x+0"
    with pytest.raises(ValueError):
        Query.from_key("plain")


def test_shifted_view_fills_with_black_pixels(world):
    """A view shifted by a whole image width shows only black (pixel value 0), whatever the image."""
    pop = world.pop
    x, _ = pop.data.batch(np.arange(3))
    black = shift_images(x, 0, x.shape[-1], pop.fill)
    expected = (torch.zeros(1, 1, 1, 1) / 255.0 - pop.mean[0]) / pop.std[0]
    torch.testing.assert_close(black, expected.expand_as(x))
