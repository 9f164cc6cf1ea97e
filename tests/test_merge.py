"""Tests for tasks/merge.py: slerp on known vectors, state-dict folding, and a real folder merge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tasks.merge import slerp, slerp_merge, slerp_state_dicts


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return math.acos(float((a @ b / (a.norm() * b.norm())).clamp(-1, 1)))


def _random_unit(n: int, seed: int) -> torch.Tensor:
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm()


# ---------------------------------------------------------------- slerp on known vectors


def test_orthogonal_unit_vectors_midpoint() -> None:
    v0, v1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    res = slerp(v0, v1, 0.5)
    torch.testing.assert_close(res, (v0 + v1) / math.sqrt(2))
    assert res.norm().item() == pytest.approx(1.0, abs=1e-6)
    # lerp would give norm 1/sqrt(2): this is what slerp is for.
    assert ((v0 + v1) / 2).norm().item() == pytest.approx(1 / math.sqrt(2))


def test_endpoints_are_exact() -> None:
    v0, v1 = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.equal(slerp(v0, v1, 0.0), v0)
    assert torch.equal(slerp(v0, v1, 1.0), v1)


def test_parallel_vectors_fall_back_to_lerp() -> None:
    v0 = torch.tensor([0.3, -1.2, 2.0, 0.5])
    v1 = 2 * v0
    for t in (0.25, 0.5, 0.9):
        torch.testing.assert_close(slerp(v0, v1, t), (1 - t) * v0 + t * v1, rtol=0, atol=1e-6)


def test_antiparallel_falls_back_without_nan() -> None:
    v0 = torch.tensor([1.0, 2.0, -3.0])
    v1 = -v0
    for t in (0.3, 0.5, 0.7):
        res = slerp(v0, v1, t)
        assert torch.isfinite(res).all()
        torch.testing.assert_close(res, (1 - t) * v0 + t * v1)


def test_zero_vector_falls_back_without_nan() -> None:
    v0, v1 = torch.zeros(6), torch.arange(6, dtype=torch.float32)
    res = slerp(v0, v1, 0.4)
    assert torch.isfinite(res).all()
    torch.testing.assert_close(res, 0.4 * v1)


@pytest.mark.parametrize("t", [0.1, 0.3, 0.5, 0.77, 0.95])
def test_unit_vectors_stay_unit_and_angle_is_t_theta(t: float) -> None:
    v0, v1 = _random_unit(64, 0), _random_unit(64, 1)
    res = slerp(v0, v1, t)
    assert res.dtype == torch.float64
    assert res.norm().item() == pytest.approx(1.0, abs=1e-9)
    theta = _angle(v0, v1)
    assert _angle(v0, res) == pytest.approx(t * theta, abs=1e-7)
    assert _angle(res, v1) == pytest.approx((1 - t) * theta, abs=1e-7)


def test_unnormalised_inputs_use_mergekit_formula() -> None:
    # The angle comes from normalised copies; the coefficients multiply the original tensors.
    g = torch.Generator().manual_seed(3)
    v0 = 3.0 * torch.randn(2, 8, generator=g, dtype=torch.float64)
    v1 = 0.5 * torch.randn(2, 8, generator=g, dtype=torch.float64)
    t = 0.3
    theta = _angle(v0, v1)
    expected = math.sin((1 - t) * theta) / math.sin(theta) * v0 + math.sin(t * theta) / math.sin(theta) * v1
    res = slerp(v0, v1, t)
    assert res.shape == (2, 8)
    torch.testing.assert_close(res, expected, rtol=1e-12, atol=1e-12)


def test_dtype_preserved_bf16() -> None:
    v0 = torch.randn(16, 16).to(torch.bfloat16)
    v1 = torch.randn(16, 16).to(torch.bfloat16)
    res = slerp(v0, v1, 0.5)
    assert res.dtype == torch.bfloat16
    expected = slerp(v0.double(), v1.double(), 0.5)
    torch.testing.assert_close(res.double(), expected, rtol=2e-2, atol=2e-2)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="same shape"):
        slerp(torch.zeros(3), torch.zeros(4), 0.5)


# ---------------------------------------------------------------- state dict merge


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(3, generator=g),
        "steps": torch.tensor([7, 8], dtype=torch.int64),
    }


def test_three_checkpoints_equal_weights_fold() -> None:
    sds = [_sd(0), _sd(1), _sd(2)]
    merged = slerp_state_dicts(sds)
    for key in ("w", "b"):
        step1 = slerp(sds[0][key], sds[1][key], 1 / 2)
        expected = slerp(step1, sds[2][key], 1 / 3)
        torch.testing.assert_close(merged[key], expected)
        assert not torch.allclose(merged[key], slerp(sds[0][key], sds[1][key], 0.5))


def test_weighted_fold_uses_cumulative_share() -> None:
    sds = [_sd(0), _sd(1), _sd(2)]
    merged = slerp_state_dicts(sds, weights=[1.0, 3.0, 4.0])
    expected = slerp(slerp(sds[0]["w"], sds[1]["w"], 3 / 4), sds[2]["w"], 4 / 8)
    torch.testing.assert_close(merged["w"], expected)


def test_two_checkpoints_equal_weights_is_midpoint() -> None:
    a, b = _sd(0), _sd(1)
    torch.testing.assert_close(slerp_state_dicts([a, b])["w"], slerp(a["w"], b["w"], 0.5))


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0], "2 checkpoints"),
        ([1.0, 0.0], "positive"),
        ([1.0, -2.0], "positive"),
        ([1.0, math.nan], "positive"),
    ],
)
def test_weights_validation(weights: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        slerp_state_dicts([_sd(0), _sd(1)], weights=weights)


def test_needs_two_checkpoints() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        slerp_state_dicts([_sd(0)])


def test_int_buffer_copied_and_checked() -> None:
    a, b = _sd(0), _sd(1)
    merged = slerp_state_dicts([a, b])
    assert merged["steps"].dtype == torch.int64
    assert torch.equal(merged["steps"], a["steps"])
    assert merged["steps"].data_ptr() != a["steps"].data_ptr()
    b["steps"] = torch.tensor([7, 9])
    with pytest.raises(ValueError, match=r"'steps'.*checkpoint 1"):
        slerp_state_dicts([a, b])


def test_missing_extra_key_and_shape_mismatch_raise_with_key_and_index() -> None:
    a, b, c = _sd(0), _sd(1), _sd(2)
    del c["b"]
    with pytest.raises(ValueError, match=r"checkpoint 2.*'b'"):
        slerp_state_dicts([a, b, c])
    c = _sd(2)
    c["lm_head.weight"] = torch.zeros(2)  # e.g. an untied head in one checkpoint only
    with pytest.raises(ValueError, match=r"checkpoint 2.*'lm_head.weight'"):
        slerp_state_dicts([a, b, c])
    b["w"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"checkpoint 1.*'w'.*shape"):
        slerp_state_dicts([a, b])


def test_relative_spread_is_the_farthest_checkpoint_over_the_reference() -> None:
    from tasks.merge import relative_spread

    a = {"w": torch.tensor([3.0, 4.0]), "step": torch.tensor([1])}
    b = {"w": torch.tensor([3.0, 4.5]), "step": torch.tensor([1])}
    c = {"w": torch.tensor([3.0, 5.0]), "step": torch.tensor([1])}
    assert relative_spread([a, b, c]) == pytest.approx(1.0 / 5.0)  # |c - a| / |a|, integer buffers ignored
    base = {"w": torch.tensor([3.0, 3.0]), "step": torch.tensor([1])}
    assert relative_spread([a, b], base) == pytest.approx(0.5 / 1.0)  # relative to the delta a - base


def test_task_vector_variant() -> None:
    base, a, b = _sd(10), _sd(0), _sd(1)
    merged = slerp_state_dicts([a, b], base=base)
    for key in ("w", "b"):
        expected_delta = slerp(a[key] - base[key], b[key] - base[key], 0.5)
        torch.testing.assert_close(merged[key] - base[key], expected_delta)
        # Different from slerp of the raw weights: the base really moved the origin.
        assert not torch.allclose(merged[key], slerp(a[key], b[key], 0.5))
    bad_base = _sd(10)
    bad_base["w"] = torch.zeros(2, 6)
    with pytest.raises(ValueError, match=r"base.*'w'"):
        slerp_state_dicts([a, b], base=bad_base)


def _np_slerp(v0, v1, t: float, eps: float = 1e-6):
    """Slerp of two flattened vectors as merge.py defines it (mergekit's convention): the angle from
    the normalised vectors, the coefficients applied to the unnormalised ones, lerp when (anti)parallel."""
    import numpy as np

    a, b = v0.ravel(), v1.ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na <= eps or nb <= eps:
        return (1 - t) * v0 + t * v1
    cos = float(np.clip(a @ b / (na * nb), -1.0, 1.0))
    if abs(cos) > 1 - eps:
        return (1 - t) * v0 + t * v1
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def _np_task_slerp(checkpoints, base, weights):
    """task_slerp in numpy: fold the deltas d_i = ckpt_i - base with t_i = w_i / (w_0 + ... + w_i),
    tensor by tensor, then add the base back."""
    out = {}
    for key, b in base.items():
        acc, total = checkpoints[0][key] - b, weights[0]
        for ckpt, w in zip(checkpoints[1:], weights[1:]):
            total += w
            acc = _np_slerp(acc, ckpt[key] - b, w / total)
        out[key] = acc + b
    return out


def _near_base(seed: int, base: dict, scale: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in base.items()}


@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, 3.0], [2.0, 1.0, 1.0]])
def test_task_slerp_is_slerp_of_the_deltas_against_a_numpy_reference(weights) -> None:
    """Checkpoints of runs on different balances from one init: far from parallel as deltas, so
    the merge walks the great circle between them. Raw-weight slerp of the same checkpoints is
    plain averaging (cos ~ 1 - 1e-8: the lerp fallback), which shrinks the delta by cos(theta/2)."""
    g = torch.Generator().manual_seed(20)
    base = {"w": 100 * torch.randn(16, 8, generator=g, dtype=torch.float64),
            "b": 100 * torch.randn(8, generator=g, dtype=torch.float64)}
    ckpts = [_near_base(30 + i, base, 0.01) for i in range(len(weights))]
    merged = slerp_state_dicts(ckpts, weights=weights, base=base)
    want = _np_task_slerp([{k: v.numpy() for k, v in c.items()} for c in ckpts],
                          {k: v.numpy() for k, v in base.items()}, weights)
    for key in base:
        assert merged[key].dtype == torch.float64
        torch.testing.assert_close(merged[key], torch.from_numpy(want[key]), rtol=1e-12, atol=1e-12)
    if weights == [1.0, 1.0]:
        lerp = slerp_state_dicts(ckpts, weights=weights)
        for key in base:
            d0, d1 = (ckpts[0][key] - base[key]).flatten(), (ckpts[1][key] - base[key]).flatten()
            assert abs(float(d0 @ d1 / (d0.norm() * d1.norm()))) < 0.5  # deltas: far from parallel
            torch.testing.assert_close(lerp[key], (ckpts[0][key] + ckpts[1][key]) / 2, rtol=0, atol=1e-12)
            norms = [float((m[key] - base[key]).norm() / d0.norm()) for m in (merged, lerp)]
            assert norms[0] > norms[1] + 0.15  # slerp keeps the delta's length, averaging loses ~30%


def test_task_slerp_of_a_base_and_one_checkpoint_gives_that_checkpoint() -> None:
    """One checkpoint (given twice: a merge needs two) relative to a base: its delta comes back."""
    base, a = _sd(10), _sd(0)
    for weights in (None, [1.0, 5.0]):
        merged = slerp_state_dicts([a, a], weights=weights, base=base)
        for key in ("w", "b"):
            torch.testing.assert_close(merged[key], a[key], rtol=0, atol=1e-6)
        assert torch.equal(merged["steps"], a["steps"])
    # and a checkpoint equal to the base adds nothing: the merge is the base plus t times the delta
    half = slerp_state_dicts([base, a], base=base)
    torch.testing.assert_close(half["w"], base["w"] + 0.5 * (a["w"] - base["w"]))


# ---------------------------------------------------------------- folder merge on real tiny checkpoints


def _tiny_checkpoint(folder: Path, seed: int) -> Path:
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    transformers.Qwen3Model(config).save_pretrained(folder, safe_serialization=True)
    (folder / "q3e.json").write_text(json.dumps({"seed": seed}))
    (folder / "README.md").write_bytes(b"tiny checkpoint\x00" + bytes([seed]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    return folder


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return _tiny_checkpoint(root / "step-100", seed=0), _tiny_checkpoint(root / "step-200", seed=1)


def test_folder_merge_loads_and_matches_slerp(two_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    import transformers

    a, b = two_checkpoints
    out = slerp_merge([a, b], tmp_path / "merged")
    assert out == tmp_path / "merged"

    # Copied verbatim from the first checkpoint; weights replaced by one merged file.
    assert (out / "q3e.json").read_text() == (a / "q3e.json").read_text()
    assert (out / "1_Pooling" / "config.json").read_text() == (a / "1_Pooling" / "config.json").read_text()
    assert (out / "config.json").read_bytes() == (a / "config.json").read_bytes()
    assert (out / "README.md").read_bytes() == (a / "README.md").read_bytes()
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    record = json.loads((out / "merge.json").read_text())
    spread = record.pop("relative_spread")
    assert record == {"method": "slerp", "checkpoints": [str(a), str(b)], "weights": [1.0, 1.0], "base": None}
    sd_a, sd_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    flat = lambda sd: torch.cat([t.double().flatten() for k, t in sorted(sd.items()) if t.is_floating_point()])
    assert spread == pytest.approx(float((flat(sd_b) - flat(sd_a)).norm() / flat(sd_a).norm()), rel=1e-9)
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())

    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}

    sd_a, sd_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    model = transformers.AutoModel.from_pretrained(out)
    loaded = model.state_dict()
    assert set(sd_a) <= set(loaded)
    for key in sd_a:
        expected = slerp(sd_a[key], sd_b[key], 0.5)
        torch.testing.assert_close(loaded[key], expected, rtol=0, atol=0, msg=key)
    key = "layers.0.mlp.up_proj.weight"
    assert not torch.equal(loaded[key], sd_a[key]) and not torch.equal(loaded[key], sd_b[key])

    with torch.no_grad():
        out_model = model(input_ids=torch.tensor([[1, 5, 9, 3]]), attention_mask=torch.ones(1, 4))
    hidden = out_model.last_hidden_state
    assert hidden.shape == (1, 4, 32)
    assert torch.isfinite(hidden).all()


def test_folder_merge_sharded_and_task_slerp(two_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_checkpoints
    # Re-shard checkpoint b by hand: two files plus an index, as save_pretrained does for big models.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    sd_b = load_file(b / "model.safetensors")
    keys = sorted(sd_b)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in halves.items():
        save_file({k: sd_b[k] for k in ks}, sharded / name, metadata={"format": "pt"})
    weight_map = {k: name for name, ks in halves.items() for k in ks}
    index = {"metadata": {}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "config.json").write_bytes((b / "config.json").read_bytes())

    out = slerp_merge([a, sharded], tmp_path / "merged", weights=[1.0, 3.0], base=b)
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "task_slerp" and record["base"] == str(b) and record["weights"] == [1.0, 3.0]
    merged = load_file(out / "model.safetensors")
    sd_a = load_file(a / "model.safetensors")
    # Checkpoint 1 equals the base, so its delta is zero: slerp falls back to lerp of the deltas.
    for key in keys:
        torch.testing.assert_close(merged[key], sd_b[key] + 0.25 * (sd_a[key] - sd_b[key]))


def test_folder_merge_replaces_existing_out_dir(two_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_checkpoints
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    slerp_merge([a, b], out)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_folder_merge_errors(two_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_checkpoints
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        slerp_merge([a, missing], tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=str(empty)):
        slerp_merge([a, empty], tmp_path / "out")
    with pytest.raises(ValueError, match="at least 2"):
        slerp_merge([a], tmp_path / "out")
    # A checkpoint whose safetensors lack a key (e.g. a tied head saved once) is refused by name.
    partial = tmp_path / "partial"
    partial.mkdir()
    sd = load_file(b / "model.safetensors")
    del sd["norm.weight"]
    save_file(sd, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"checkpoint 1.*'norm.weight'"):
        slerp_merge([a, partial], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())
