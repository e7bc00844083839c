"""The soul: a gated SO(8) rotation between the final hidden state and the LM head.

    h' = h + sigmoid(alpha) * R h

R is block-diagonal: hidden/8 independent 8x8 blocks, block b acting on
hidden dims 8b..8b+7 as a matrix on a column vector. Each block is the
matrix exponential of a skew-symmetric matrix, exp(A - A^T), so R^T R = I and
det R = +1 hold by construction (exp of a skew matrix is a rotation), and
R = I when the generator is zero, which is how it starts.

alpha is not learned: it follows the phase-transition schedule
(`alpha_at`). Because the soul is linear in h, it folds exactly into the
head: W h' = (W + sigmoid(alpha) W R) h (`fold_soul_into_head`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .config import SOUL_BLOCK, SoulSection
from .errors import SoulError
from .tensors import write_safetensors

SOUL_FILE = "soul.safetensors"
SOUL_FORMAT = "agiasi-soul/1"


def alpha_at(step: int, s: SoulSection) -> float:
    """Alpha after `step` completed optimizer steps.

    chaos: hold alpha_start for warmup_steps; transition: linear to
    alpha_target over anneal_steps; order: hold alpha_target.
    """
    if step <= s.warmup_steps:
        return s.alpha_start
    if step >= s.warmup_steps + s.anneal_steps:
        return s.alpha_target
    frac = (step - s.warmup_steps) / s.anneal_steps
    return s.alpha_start + frac * (s.alpha_target - s.alpha_start)


def phase_at(step: int, s: SoulSection) -> str:
    if step < s.warmup_steps:
        return "chaos"
    if step < s.warmup_steps + s.anneal_steps:
        return "transition"
    return "order"


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# exp by scaling and squaring with a fixed schedule: exp(S) = exp(S / 2^k)^(2^k),
# the inner exp a degree-12 Taylor series. A fixed schedule is a handful of
# batched 8x8 products with no data-dependent branch, where
# torch.linalg.matrix_exp on CUDA syncs with the host to pick its degree and
# made a training step several times slower. Float64 inside keeps R^T R = I
# to ~1e-7 after the cast back; the truncation error is below 1e-12 for
# ||S|| up to 1000.
_EXP_SQUARINGS = 10
_EXP_TAYLOR_DEGREE = 12


def skew_exp(s: torch.Tensor) -> torch.Tensor:
    """exp(S) for a batch of matrices [..., n, n], as float64."""
    x = s.double() / 2**_EXP_SQUARINGS
    eye = torch.eye(s.shape[-1], dtype=x.dtype, device=x.device).expand_as(x)
    p = eye
    for k in range(_EXP_TAYLOR_DEGREE, 0, -1):  # Horner: I + X(I + X/2(I + X/3(...)))
        p = torch.baddbmm(eye, x, p, alpha=1.0 / k) if x.ndim == 3 else eye + (x @ p) / k
    for _ in range(_EXP_SQUARINGS):
        p = p @ p
    return p


def rotation_from_generator(generator: torch.Tensor) -> torch.Tensor:
    """exp(A - A^T) per 8x8 block, returned in float32: a rotation (R^T R = I, det R = +1)."""
    a = generator.double()
    return skew_exp(a - a.transpose(-1, -2)).float()


def apply_blocks(rotation: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """R h for block-diagonal R given as [n_blocks, 8, 8]; h is [..., hidden]."""
    hb = h.unflatten(-1, (rotation.shape[0], SOUL_BLOCK))
    return torch.einsum("bij,...bj->...bi", rotation, hb).flatten(-2)


def orthogonality_error(rotation: torch.Tensor) -> torch.Tensor:
    """max over blocks of ||R^T R - I||_F (0 for an exact rotation)."""
    eye = torch.eye(SOUL_BLOCK, dtype=rotation.dtype, device=rotation.device)
    gram = rotation.transpose(-1, -2) @ rotation
    return torch.linalg.matrix_norm(gram - eye).max()


class SO8Soul(nn.Module):
    """The learned part: a skew generator per 8x8 block (or one shared by all), and alpha.

    alpha is a parameter that does not train while the schedule sets it; with
    `soul.learn_alpha` it trains once the schedule has reached its target.
    """

    def __init__(self, hidden_size: int, alpha: float = 0.0, shared: bool = False):
        super().__init__()
        if hidden_size % SOUL_BLOCK:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {SOUL_BLOCK}")
        self.n_blocks = hidden_size // SOUL_BLOCK
        self.generator = nn.Parameter(torch.zeros(1 if shared else self.n_blocks, SOUL_BLOCK, SOUL_BLOCK))
        self.alpha = nn.Parameter(torch.tensor(float(alpha), dtype=torch.float32), requires_grad=False)

    @classmethod
    def from_state(cls, state: SoulState) -> SO8Soul:
        """The module a saved soul describes (block-wise or shared)."""
        n = state.rotation.shape[0]
        soul = cls(n * SOUL_BLOCK, alpha=state.alpha, shared=state.generator.shape[0] == 1 and n > 1)
        with torch.no_grad():
            soul.generator.copy_(state.generator)
        return soul

    def rotation(self) -> torch.Tensor:
        """[hidden/8, 8, 8] float32; a shared block is repeated along the hidden dimension."""
        r = rotation_from_generator(self.generator)
        return r.expand(self.n_blocks, -1, -1) if r.shape[0] != self.n_blocks else r

    def set_alpha(self, value: float) -> None:
        with torch.no_grad():
            self.alpha.fill_(value)

    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # float32 even under bf16 autocast: the rotation must stay exact.
        with torch.autocast(device_type=h.device.type, enabled=False):
            h32 = h.float()
            out = h32 + self.gate() * apply_blocks(self.rotation(), h32)
        return out.to(h.dtype)


class SoulHead(nn.Module):
    """The LM head with the soul in front of it: logits = W (h + g R h).

    Replacing the model's `lm_head` with this keeps `generate()` and every
    other caller of the head unchanged.
    """

    def __init__(self, head: nn.Module, soul: SO8Soul):
        super().__init__()
        self.head = head
        self.soul = soul

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.soul(h))


def fold_soul_into_head(weight: torch.Tensor, rotation: torch.Tensor, alpha: float,
                        out_dtype: torch.dtype | None = None, rows: int = 4096) -> torch.Tensor:
    """W' = W + sigmoid(alpha) * W R, computed in float32, returned in out_dtype (default W's).

    weight: [vocab, hidden]; rotation: [hidden/8, 8, 8]. Computed `rows`
    vocabulary rows at a time, so the float32 temporaries stay small next to
    a 32k x 3072 head.
    """
    out = torch.empty(weight.shape, dtype=out_dtype or weight.dtype, device=weight.device)
    start = 0
    for part in fold_soul_rows(weight, rotation, alpha, out_dtype, rows):
        out[start:start + part.shape[0]] = part
        start += part.shape[0]
    return out


def fold_soul_rows(weight: torch.Tensor, rotation: torch.Tensor, alpha: float,
                   out_dtype: torch.dtype | None = None, rows: int = 4096) -> Iterator[torch.Tensor]:
    """fold_soul_into_head, yielded `rows` rows at a time (a streaming writer never holds W' whole)."""
    vocab, hidden = weight.shape
    if hidden != rotation.shape[0] * SOUL_BLOCK:
        raise ValueError(
            f"soul has {rotation.shape[0]} blocks ({rotation.shape[0] * SOUL_BLOCK} dims) "
            f"but the head's hidden size is {hidden}"
        )
    r, g = rotation.float(), sigmoid(alpha)
    for start in range(0, vocab, rows):
        w = weight[start:start + rows].float()
        wr = torch.einsum("vbi,bij->vbj", w.view(w.shape[0], -1, SOUL_BLOCK), r).reshape(w.shape)
        yield (w + g * wr).to(out_dtype or weight.dtype)


@dataclass(frozen=True)
class SoulState:
    """What a checkpoint's soul.safetensors holds."""

    alpha: float
    rotation: torch.Tensor  # [hidden/8, 8, 8] float32
    generator: torch.Tensor  # [hidden/8, 8, 8] float32

    @property
    def gate(self) -> float:
        return sigmoid(self.alpha)


def save_soul(path: Path, soul: SO8Soul, step: int) -> None:
    """Write soul.safetensors: alpha (scalar), rotation and generator (float32)."""
    tensors = {
        "alpha": soul.alpha.detach().float().cpu().reshape(()).contiguous(),
        "rotation": soul.rotation().detach().float().cpu().contiguous(),
        "generator": soul.generator.detach().float().cpu().contiguous(),
    }
    meta = {"format": SOUL_FORMAT, "step": str(step), "block": str(SOUL_BLOCK),
            "shared": str(soul.generator.shape[0] == 1 and soul.n_blocks > 1).lower()}
    # Our own writer, not safetensors' save(): that one orders metadata keys by a per-process
    # hash, so the same soul would give different bytes (and sha256) in each run.
    write_safetensors(path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], tensors.__getitem__,
                      metadata=meta)


def load_soul(path: Path) -> SoulState:
    """Read soul.safetensors. Raises SoulError (a ValueError) naming the file when malformed."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = {"alpha", "rotation"} - keys
            if missing:
                raise SoulError(f"{path}: missing tensors {sorted(missing)}")
            alpha = f.get_tensor("alpha").float().reshape(-1)
            rotation = f.get_tensor("rotation").float()
            generator = f.get_tensor("generator").float() if "generator" in keys else None
    except (OSError, json.JSONDecodeError) as e:
        raise SoulError(f"{path}: not a readable safetensors file: {e}") from None
    except Exception as e:  # safetensors raises its own error type on bad headers
        if isinstance(e, ValueError) and str(path) in str(e):
            raise
        raise SoulError(f"{path}: not a readable safetensors file: {e}") from None
    if alpha.numel() != 1:
        raise SoulError(f"{path}: alpha must be a single number, got shape {list(alpha.shape)}")
    if rotation.ndim != 3 or rotation.shape[1:] != (SOUL_BLOCK, SOUL_BLOCK):
        raise SoulError(f"{path}: rotation must have shape [n, 8, 8], got {list(rotation.shape)}")
    if not (math.isfinite(float(alpha.item())) and torch.isfinite(rotation).all()
            and (generator is None or torch.isfinite(generator).all())):
        raise SoulError(f"{path}: holds NaN or infinite values")
    if generator is None:  # a soul imported without its generator: recover it from R
        generator = generator_from_rotation(rotation, str(path))
    if generator.shape[1:] != rotation.shape[1:] or generator.shape[0] not in (1, rotation.shape[0]):
        raise SoulError(f"{path}: generator shape {list(generator.shape)} does not fit rotation {list(rotation.shape)}")
    return SoulState(alpha=float(alpha.item()), rotation=rotation, generator=generator)


def generator_from_rotation(rotation: torch.Tensor, where: str) -> torch.Tensor:
    """A generator A with exp(A - A^T) = R for each block (A = log(R) / 2).

    Raises SoulError naming `where` when a block is not in SO(8), or is a
    half-turn (eigenvalue -1), whose logarithm is not unique.
    """
    r = rotation.double()
    if orthogonality_error(r) > 1e-4 or (torch.linalg.det(r) < 0).any():
        raise SoulError(f"{where}: the rotation is not in SO(8) (R^T R != I or det R = -1)")
    vals, vecs = torch.linalg.eig(r)
    if ((vals + 1).abs() < 1e-6).any():
        raise SoulError(f"{where}: a block turns by 180 degrees; its generator is not unique")
    log = (vecs @ torch.diag_embed(vals.log()) @ torch.linalg.inv(vecs)).real
    skew = (log - log.transpose(-1, -2)) / 2
    generator = (skew / 2).float()
    if (rotation_from_generator(generator) - rotation.float()).abs().max() > 1e-4:
        raise SoulError(f"{where}: could not recover a generator for this rotation")
    return generator


def import_seed_soul(pt_path: Path, out_path: Path, hidden_size: int | None = None, step: int = 0) -> SoulState:
    """Convert the seeds' soul.pt ({"alpha", "so8_rotation"}) to soul.safetensors.

    The file is read with torch.load(weights_only=True): tensors and plain
    containers only, so a crafted pickle cannot run code. so8_rotation may be
    one 8x8 block, shared across the hidden dimension (hidden_size is then
    required), or [n, 8, 8] blocks (hidden_size, if given, must be 8n).
    """
    if not Path(pt_path).is_file():
        raise SoulError(f"{pt_path}: file not found")
    try:
        raw = torch.load(str(pt_path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything beyond tensors and containers
        raise SoulError(f"{pt_path}: not a plain tensor file, refused ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict) or not {"alpha", "so8_rotation"} <= set(raw):
        raise SoulError(f"{pt_path}: expected a dict with 'alpha' and 'so8_rotation'")
    try:
        alpha = torch.as_tensor(raw["alpha"], dtype=torch.float32).reshape(-1)
        rot = torch.as_tensor(raw["so8_rotation"]).float()
    except (TypeError, ValueError, RuntimeError) as e:
        raise SoulError(f"{pt_path}: alpha and so8_rotation must be numbers and tensors ({e})") from None
    if alpha.numel() != 1 or not math.isfinite(float(alpha[0])):
        raise SoulError(f"{pt_path}: alpha must be one finite number, got {alpha.tolist()[:4]}")
    alpha = float(alpha[0])
    if rot.shape == (SOUL_BLOCK, SOUL_BLOCK):
        rot = rot.unsqueeze(0)
    if rot.ndim != 3 or rot.shape[1:] != (SOUL_BLOCK, SOUL_BLOCK):
        raise SoulError(f"{pt_path}: so8_rotation has shape {list(rot.shape)}, expected [8, 8] or [n, 8, 8]")
    if not torch.isfinite(rot).all():
        raise SoulError(f"{pt_path}: so8_rotation holds NaN or infinite values")
    shared = rot.shape[0] == 1
    if shared and not hidden_size:
        raise SoulError(f"{pt_path}: one shared 8x8 rotation; give the model's hidden size to expand it")
    if not shared and hidden_size and hidden_size != rot.shape[0] * SOUL_BLOCK:
        raise SoulError(f"{pt_path}: {rot.shape[0]} blocks of 8 do not fit hidden size {hidden_size}")
    generator = generator_from_rotation(rot, str(pt_path))
    soul = SO8Soul(hidden_size or rot.shape[0] * SOUL_BLOCK, alpha=alpha, shared=shared)
    with torch.no_grad():
        soul.generator.copy_(generator)
    save_soul(out_path, soul, step)
    return load_soul(out_path)
