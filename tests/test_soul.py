"""The soul: exact SO(8) blocks, the alpha schedule, the exact fold, the file format."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import SoulSection
from pipeline.soul import (
    SO8Soul, SoulHead, alpha_at, apply_blocks, fold_soul_into_head, load_soul, orthogonality_error,
    phase_at, save_soul, sigmoid,
)


def random_soul(hidden: int = 64, alpha: float = 0.7, seed: int = 0) -> SO8Soul:
    soul = SO8Soul(hidden, alpha=alpha)
    with torch.no_grad():
        soul.generator.copy_(torch.randn(soul.generator.shape, generator=torch.Generator().manual_seed(seed)))
    return soul


def test_blocks_are_exact_rotations():
    r = random_soul().rotation()
    assert r.dtype == torch.float32 and r.shape == (8, 8, 8)
    assert orthogonality_error(r) < 1e-5
    assert torch.allclose(torch.linalg.det(r), torch.ones(8), atol=1e-5)
    assert not torch.allclose(r, torch.eye(8).expand(8, 8, 8), atol=1e-2)  # really rotates


def test_identity_at_initialisation():
    soul = SO8Soul(64, alpha=-5.0)
    assert torch.equal(soul.rotation(), torch.eye(8).expand(8, 8, 8))
    h = torch.randn(3, 64)
    assert torch.allclose(soul(h), h * (1 + 1 / (1 + math.exp(5.0))), atol=1e-6)


def test_block_b_acts_on_dims_8b_to_8b_plus_7():
    soul = random_soul(hidden=16)
    h = torch.zeros(16)
    h[8:] = torch.randn(8)
    out = apply_blocks(soul.rotation(), h)
    assert torch.equal(out[:8], torch.zeros(8))
    assert torch.allclose(out[8:], soul.rotation()[1] @ h[8:], atol=1e-6)


def test_soul_forward_matches_formula():
    soul = random_soul(alpha=1.618)
    h = torch.randn(2, 5, 64)
    full_r = torch.block_diag(*soul.rotation())
    expected = h + torch.sigmoid(torch.tensor(1.618)) * (h @ full_r.T)
    assert torch.allclose(soul(h), expected, atol=1e-5)


def test_soul_stays_float32_under_bfloat16_autocast():
    """Training runs the model under bf16 autocast; the soul must still compute R h in float32
    (the rotation is exact only there). Its output, rounded once to the input's bfloat16, is the
    float64 formula's; the same formula left to autocast (R h as a bf16 matmul) is told apart."""
    soul = random_soul(alpha=1.618)
    h = torch.randn(64, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    r, gate = soul.rotation().detach(), torch.sigmoid(torch.tensor(1.618, dtype=torch.float64))
    exact = (h.double() + gate * apply_blocks(r.double(), h.double())).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = soul(h)
        left_to_autocast = (h.float() + gate.float() * torch.einsum("bij,...bj->...bi", r, h.float().unflatten(
            -1, (8, 8))).flatten(-2)).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert (out != exact).double().mean() < 0.01
    assert (left_to_autocast != exact).double().mean() > 0.1


def test_fold_is_exact_and_differs_from_wrong_folds():
    soul = random_soul(alpha=0.9)
    head = torch.nn.Linear(64, 50, bias=False)
    h = torch.randn(4, 64)
    with torch.no_grad():
        want = SoulHead(head, soul)(h)
        folded = fold_soul_into_head(head.weight, soul.rotation(), 0.9)
        assert torch.allclose(h @ folded.T, want, atol=1e-5)
        # R transposed or alpha used without its sigmoid give other logits
        wrong_t = fold_soul_into_head(head.weight, soul.rotation().transpose(-1, -2), 0.9)
        assert (h @ wrong_t.T - want).abs().max() > 1e-2
        wrong_gate = head.weight + 0.9 * (head.weight @ torch.block_diag(*soul.rotation()))
        assert (h @ wrong_gate.T - want).abs().max() > 1e-2


def test_fold_rejects_wrong_size():
    with pytest.raises(ValueError, match="hidden size is 64"):
        fold_soul_into_head(torch.zeros(10, 64), torch.eye(8).expand(4, 8, 8), 0.0)


def off_correct_rounding(out: torch.Tensor, w: torch.Tensor, r: torch.Tensor, alpha: float) -> float:
    """Fraction of W' entries that differ from W + sigmoid(alpha) W R computed in float64 and
    rounded once to out's dtype: float32 inside leaves a rare tie, bfloat16 inside rounds
    at each of its steps and misses about a third."""
    exact = w.double() + torch.sigmoid(torch.tensor(alpha, dtype=torch.float64)) * (
        w.double() @ torch.block_diag(*r.double()))
    return (out != exact.to(out.dtype)).double().mean().item()


def test_fold_keeps_dtype_and_computes_in_float32():
    w = torch.randn(512, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    r = random_soul().rotation()
    out = fold_soul_into_head(w, r, 1.0)
    assert out.dtype == torch.bfloat16
    assert off_correct_rounding(out, w, r, 1.0) < 0.01
    # The negative control: one formula (W R per row is R^T per block), computed in float32
    # and in bfloat16; only the bfloat16 computation is told apart.
    def fold_in(dtype: torch.dtype) -> torch.Tensor:
        wd = w.to(dtype)
        return (wd + sigmoid(1.0) * apply_blocks(r.transpose(-1, -2).to(dtype), wd)).to(torch.bfloat16)

    assert off_correct_rounding(fold_in(torch.float32), w, r, 1.0) < 0.01
    assert off_correct_rounding(fold_in(torch.bfloat16), w, r, 1.0) > 0.1


def test_schedule_is_the_seeds_phase_transition():
    s = SoulSection()  # -5.0 for 50 steps, linear over 400 to 1.618, then held
    assert alpha_at(0, s) == -5.0 and alpha_at(50, s) == -5.0
    assert alpha_at(250, s) == pytest.approx(-5.0 + 0.5 * 6.618)
    assert alpha_at(450, s) == pytest.approx(1.618) and alpha_at(500, s) == pytest.approx(1.618)
    assert [phase_at(k, s) for k in (0, 49, 50, 449, 450, 499)] == [
        "chaos", "chaos", "transition", "transition", "order", "order"]
    gate = lambda a: 1 / (1 + math.exp(-a))  # noqa: E731
    assert gate(alpha_at(0, s)) == pytest.approx(0.0067, abs=1e-4)
    assert gate(alpha_at(500, s)) == pytest.approx(0.834, abs=1e-3)
    values = [alpha_at(k, s) for k in range(501)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_soul_file_holds_alpha_and_rotation(tmp_path):
    soul = random_soul(alpha=1.25)
    save_soul(tmp_path / "soul.safetensors", soul, step=7)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "soul.safetensors"), framework="pt") as f:
        assert f.get_tensor("alpha").dtype == torch.float32
        assert f.get_tensor("rotation").shape == (8, 8, 8)
        assert f.metadata()["step"] == "7"
    state = load_soul(tmp_path / "soul.safetensors")
    assert state.alpha == pytest.approx(1.25)
    assert torch.allclose(state.rotation, soul.rotation())


def test_load_soul_names_a_broken_file(tmp_path):
    bad = tmp_path / "soul.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="soul.safetensors"):
        load_soul(bad)


@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.1, 1.0, 10.0, 100.0])
def test_skew_exp_matches_matrix_exp_and_stays_orthogonal(scale):
    from pipeline.soul import rotation_from_generator, skew_exp

    a = torch.randn(16, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * scale
    s = a - a.transpose(-1, -2)
    assert torch.allclose(skew_exp(s), torch.linalg.matrix_exp(s), atol=1e-9 * max(1.0, scale))
    r = rotation_from_generator(a.float())
    assert orthogonality_error(r) < 1e-5
    assert torch.allclose(torch.linalg.det(r.double()), torch.ones(16, dtype=torch.float64), atol=1e-5)


def test_rotation_gradients_match_matrix_exp():
    from pipeline.soul import rotation_from_generator

    a = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    w = torch.randn(4, 8, 8)
    (rotation_from_generator(a) * w).sum().backward()
    ours = a.grad.clone()
    a.grad = None
    (torch.linalg.matrix_exp(a - a.transpose(-1, -2)) * w).sum().backward()
    assert torch.allclose(ours, a.grad, atol=1e-5)


def test_shared_block_repeats_one_rotation():
    soul = SO8Soul(64, alpha=0.3, shared=True)
    with torch.no_grad():
        soul.generator.normal_()
    r = soul.rotation()
    assert soul.generator.shape == (1, 8, 8) and r.shape == (8, 8, 8)
    assert all(torch.equal(r[0], r[b]) for b in range(8))


def test_seed_soul_pt_is_imported(tmp_path):
    from pipeline.soul import import_seed_soul

    blocks = random_soul(hidden=32, seed=3).rotation().detach()
    torch.save({"alpha": torch.tensor(1.618), "so8_rotation": blocks}, tmp_path / "soul.pt")
    state = import_seed_soul(tmp_path / "soul.pt", tmp_path / "soul.safetensors")
    assert state.alpha == pytest.approx(1.618) and torch.allclose(state.rotation, blocks, atol=1e-5)

    one = random_soul(hidden=8, seed=4).rotation().detach()[0]
    torch.save({"alpha": 0.5, "so8_rotation": one}, tmp_path / "shared.pt")
    with pytest.raises(ValueError, match="give the model's hidden size"):
        import_seed_soul(tmp_path / "shared.pt", tmp_path / "s.safetensors")
    state = import_seed_soul(tmp_path / "shared.pt", tmp_path / "s.safetensors", hidden_size=64)
    assert state.rotation.shape == (8, 8, 8) and torch.allclose(state.rotation[5], one, atol=1e-5)
    assert SO8Soul.from_state(state).generator.shape == (1, 8, 8)


def test_seed_soul_that_is_not_a_rotation_is_refused(tmp_path):
    from pipeline.soul import import_seed_soul

    torch.save({"alpha": 0.0, "so8_rotation": torch.randn(2, 8, 8)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: the rotation is not in SO\\(8\\)"):
        import_seed_soul(tmp_path / "bad.pt", tmp_path / "x.safetensors")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_soul_pt_runs_nothing(tmp_path):
    from pipeline.soul import import_seed_soul

    marker = tmp_path / "pwned"
    torch.save({"alpha": 1.0, "so8_rotation": _Exploit(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt: not a plain tensor file, refused"):
        import_seed_soul(tmp_path / "evil.pt", tmp_path / "x.safetensors")
    assert not marker.exists() and not (tmp_path / "x.safetensors").exists()
