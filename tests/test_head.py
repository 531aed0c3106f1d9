import numpy as np
import pytest
import torch

from training import Head, train_head
from training.train import train_heads
from usam_backend.core.errors import DataError, HeadError


def toy_bags(seed: int = 0, n: int = 24, d: int = 20, dim: int = 16):
    """Two classes; each bag has 6 points near its class centre and background noise elsewhere."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(2, dim))
    bags = rng.normal(0, 1, size=(n, d, dim)).astype(np.float32)
    targets = np.zeros((n, 2), dtype=np.float32)
    for i in range(n):
        targets[i, i % 2] = 1
        bags[i, :6] += centres[i % 2]
    return bags, targets


FAST = {"epochs": 5, "hidden": (32, 16, 8)}


class Payload:
    """An arbitrary object: pickled into a file, it must be refused (weights_only loading)."""


def test_artifact_round_trip(tmp_path):
    bags, targets = toy_bags()
    head = train_head(bags, targets, ["cat", "dog"], **FAST)
    head.info.update(sam_type="tiny", points=20)
    path = head.save(tmp_path / "head.pt")
    loaded = Head.load(path, sam_type="tiny", embedding_dim=16)
    x = bags.reshape(-1, 16)
    assert np.allclose(loaded.predict_proba(x), head.predict_proba(x))
    assert loaded.class_names == ("cat", "dog") and loaded.version == head.version
    assert loaded.info["training"]["options"]["epochs"] == 5
    assert loaded.info["training"]["role"] == "student"
    assert loaded.config == head.config


def test_predict_proba_shapes_and_types():
    bags, targets = toy_bags()
    head = train_head(bags, targets, ["cat", "dog"], distill=False, **FAST)
    probs = head.predict_proba(bags[0])
    assert isinstance(probs, np.ndarray) and probs.shape == (20, 2)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # no background output: classes sum to 1
    tensor_probs = head.predict_proba(torch.from_numpy(bags[0]))
    assert isinstance(tensor_probs, torch.Tensor)
    with pytest.raises(HeadError, match=r"shape \(n, 16\)"):
        head.predict_proba(np.zeros((3, 8), dtype=np.float32))


def test_sam_type_mismatch_is_a_clear_error(tmp_path):
    bags, targets = toy_bags()
    head = train_head(bags, targets, ["cat", "dog"], **FAST)
    head.info["sam_type"] = "vit_t"
    path = head.save(tmp_path / "head.pt")
    with pytest.raises(HeadError, match=r"trained on vit_t embeddings.*USAM_SAM_TYPE=vit_t"):
        Head.load(path, sam_type="tiny", embedding_dim=16)
    with pytest.raises(HeadError, match=r"\(16-d\).*\(256-d\)"):
        Head.load(path, sam_type="vit_t", embedding_dim=256)


def test_unreadable_artifacts(tmp_path):
    with pytest.raises(HeadError, match="no head artifact"):
        Head.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(HeadError, match="not a readable usam head"):
        Head.load(tmp_path / "junk.pt")

    torch.save({"format": "usam-head/1", "config": Payload()}, tmp_path / "pickle.pt")
    with pytest.raises(HeadError, match="not a readable usam head"):
        Head.load(tmp_path / "pickle.pt")


def test_training_is_deterministic_per_seed():
    bags, targets = toy_bags()
    first = train_heads(bags, targets, ["cat", "dog"], seed=3, **FAST)
    second = train_heads(bags, targets, ["cat", "dog"], seed=3, **FAST)
    other = train_heads(bags, targets, ["cat", "dog"], seed=4, **FAST)
    for a, b in zip(
        first.final.net.state_dict().values(),
        second.final.net.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert first.final.version == second.final.version != other.final.version
    assert first.teacher.version != first.final.version


def test_input_dimension_comes_from_the_data():
    bags, targets = toy_bags(dim=12)
    assert train_head(bags, targets, ["a", "b"], **FAST).config.input_dim == 12


def test_negative_bags_switch_on_the_background_output():
    bags, targets = toy_bags()
    targets[:4] = 0  # four images with none of the classes
    head = train_head(bags, targets, ["cat", "dog"], **FAST)
    assert head.config.background and head.config.outputs == 3
    probs = head.predict_proba(bags[0])
    assert (probs.sum(axis=1) < 1.0).all()  # what is left is the background probability


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b, t, n: (b[0], t, n), r"shape \(N, d, D\)"),
        (lambda b, t, n: (b, t[:, :1], n), r"targets must have shape"),
        (lambda b, t, n: (b, t, ["cat", "cat"]), "unique"),
        (lambda b, t, n: (np.where(np.arange(b.size).reshape(b.shape) == 0, np.nan, b), t, n), "NaN"),
        (lambda b, t, n: (b, np.stack([t[:, 0] + t[:, 1], 0 * t[:, 1]], 1), n), "no bag or instance is labelled"),
        (lambda b, t, n: (b, t[:, :1] * 0 + 1, ["cat"]), "one class alone"),
    ],
)
def test_bad_training_inputs(change, message):
    bags, targets = toy_bags()
    bags, targets, names = change(bags, targets, ["cat", "dog"])
    with pytest.raises(DataError, match=message):
        train_head(bags, targets, names, **FAST)


def test_unknown_option_lists_the_valid_ones():
    bags, targets = toy_bags()
    with pytest.raises(TypeError, match=r"unknown training option.*'epochs'"):
        train_head(bags, targets, ["cat", "dog"], epoch=3)
