"""Stage 1, train: LoRA (on an NF4 base when configured) plus the SO(8) soul.

The life of a run: `setup` loads the base (4-bit NF4 through bitsandbytes
when configured), wraps it with LoRA, puts the soul in front of the LM head
and tokenizes the data; `train` runs the optimizer steps with alpha set by
the phase-transition schedule; `save_checkpoint` writes
`checkpoints/step_NNNNNN/` every `save_every` steps and `checkpoints/final/`
at the end. Each checkpoint folder holds the PEFT adapter
(adapter_config.json, adapter_model.safetensors), soul.safetensors and
checkpoint.json, which is written last and marks the folder complete.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import atomic_dir, atomic_write_text
from .config import CHECKPOINT_MARKER, Config
from .data import collate, example_order, load_examples
from .hf import DTYPES, load_causal_lm, load_tokenizer, pick_device, resolve_base
from .soul import SOUL_FILE, SO8Soul, SoulHead, alpha_at, orthogonality_error, phase_at, save_soul

def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def use_nf4(cfg: Config, device: torch.device) -> bool:
    """`auto` means NF4 where CUDA is present, full precision elsewhere."""
    q = cfg.train.quantization
    return q == "nf4" or (q == "auto" and device.type == "cuda")


@dataclass
class StepMetrics:
    step: int
    phase: str
    alpha: float
    gate: float
    loss: float
    lm_loss: float
    ortho_error: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    elapsed_s: float


class Trainer:
    """One training run, from a validated config to checkpoints on disk."""

    def __init__(self, cfg: Config, *, log=print):
        self.cfg = cfg
        self.log = log
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"

    # -- setup -------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.run.seed)
        self.device = pick_device(cfg.train.device)
        self.base_dir = resolve_base(cfg)
        self.nf4 = use_nf4(cfg, self.device)
        compute = DTYPES[cfg.train.compute_dtype]
        if self.device.type == "cpu" and compute != torch.float32:
            compute = torch.float32  # bf16 matmuls on CPU are slow and gain nothing here
        self.compute_dtype = compute
        self.tokenizer = load_tokenizer(self.base_dir)
        self.examples = load_examples(cfg.resolve(cfg.data.train), self.tokenizer, cfg.data.max_length)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        model = load_causal_lm(
            self.base_dir, nf4=self.nf4, compute_dtype=compute, device=self.device,
            double_quant=cfg.train.double_quant,
            dtype=compute if self.device.type == "cuda" else torch.float32,
        )
        self.model = wrap_with_lora_and_soul(model, cfg, alpha=alpha_at(0, cfg.soul))
        if cfg.train.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.soul = soul_of(self.model)
        lora_params = [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": lora_params, "lr": cfg.train.lr},
                {"params": [self.soul.generator], "lr": cfg.soul.lr or cfg.train.lr},
            ],
            weight_decay=cfg.train.weight_decay,
        )
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        n_lora = sum(p.numel() for p in lora_params)
        self.log(
            f"[train] base {self.base_dir.name} on {self.device} ({'NF4' if self.nf4 else 'full precision'}), "
            f"{len(self.examples)} examples, {n_lora:,} LoRA + {self.soul.generator.numel():,} soul parameters"
        )

    # -- train -------------------------------------------------------------
    def train(self) -> Path:
        cfg, t = self.cfg, self.cfg.train
        metrics_path = self.run_dir / "metrics.jsonl"
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics = metrics_path.open("w", encoding="utf-8")
        per_step = t.batch_size * t.grad_accum
        start = time.perf_counter()
        autocast = torch.autocast(
            device_type=self.device.type, dtype=self.compute_dtype,
            enabled=self.device.type == "cuda" and self.compute_dtype != torch.float32,
        )
        progress = make_progress(t.steps)
        try:
            for step in range(t.steps):
                alpha = alpha_at(step, cfg.soul)
                self.soul.alpha.fill_(alpha)
                lr_scale = min(1.0, (step + 1) / t.lr_warmup_steps) if t.lr_warmup_steps else 1.0
                for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
                    group["lr"] = base_lr * lr_scale

                t0 = time.perf_counter()
                order = example_order(len(self.examples), step, per_step, cfg.run.seed)
                lm_loss, tokens = 0.0, 0
                for m in range(t.grad_accum):
                    batch = collate([self.examples[i] for i in order[m * t.batch_size:(m + 1) * t.batch_size]],
                                    self.pad_id)
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    with autocast:
                        out = self.model(**batch)
                    (out.loss / t.grad_accum).backward()
                    lm_loss += out.loss.item() / t.grad_accum
                    tokens += int(batch["attention_mask"].sum())
                rotation = self.soul.rotation()
                ortho = orthogonality_error(rotation)
                if cfg.soul.ortho_weight:
                    (cfg.soul.ortho_weight * ortho.square()).backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for g in self.optimizer.param_groups for p in g["params"]], t.max_grad_norm
                )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

                dt = time.perf_counter() - t0
                row = StepMetrics(
                    step=step + 1, phase=phase_at(step, cfg.soul), alpha=alpha,
                    gate=1 / (1 + math.exp(-alpha)),
                    loss=lm_loss + cfg.soul.ortho_weight * ortho.item() ** 2, lm_loss=lm_loss,
                    ortho_error=ortho.item(), lr=self.optimizer.param_groups[0]["lr"],
                    grad_norm=float(grad_norm), tokens_per_s=tokens / dt if dt > 0 else 0.0,
                    elapsed_s=time.perf_counter() - start,
                )
                metrics.write(json.dumps(row.__dict__) + "\n")
                metrics.flush()
                progress.update(row)
                if (step + 1) % t.save_every == 0 and step + 1 < t.steps:
                    self.save_checkpoint(step + 1, checkpoint_name(step + 1))
        finally:
            progress.close()
            metrics.close()
        self.save_checkpoint(t.steps, checkpoint_name(t.steps))
        return self.save_checkpoint(t.steps, "final")

    # -- save_checkpoint -----------------------------------------------------
    def save_checkpoint(self, step: int, name: str) -> Path:
        """Write one complete checkpoint folder atomically; returns its path."""
        # The soul in a checkpoint carries the alpha the schedule gives after
        # `step` steps: that is the model a user gets from this checkpoint.
        self.soul.alpha.fill_(alpha_at(step, self.cfg.soul))
        final = self.ckpt_dir / name
        with atomic_dir(final) as tmp:
            self.model.save_pretrained(str(tmp), safe_serialization=True)
            save_soul(tmp / SOUL_FILE, self.soul, step)
            atomic_write_text(tmp / CHECKPOINT_MARKER, json.dumps({
                "step": step,
                "alpha": float(self.soul.alpha),
                "gate": float(self.soul.gate()),
                "base": self.cfg.model.base,
                "revision": self.cfg.model.revision,
                "quantization": "nf4" if self.nf4 else "none",
                "train_config_sha256": self.cfg.section_digest("train"),
            }, indent=1) + "\n")
        self.log(f"[train] wrote {final}")
        return final


def wrap_with_lora_and_soul(model, cfg: Config, *, alpha: float):
    """PEFT LoRA on the configured modules, then the soul in front of the head.

    LoRA weights and the soul's generator are the only trainable parameters;
    the base and the LM head stay frozen.
    """
    from peft import LoraConfig, get_peft_model

    lora = cfg.train.lora
    peft_cfg = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, peft_cfg)
    inner = peft_model.base_model.model
    head = inner.lm_head
    for p in head.parameters():
        p.requires_grad_(False)
    soul = SO8Soul(head.weight.shape[1], alpha=alpha).to(head.weight.device)
    inner.lm_head = SoulHead(head, soul)
    # The adapter names the base as the user configured it (hub id), or by its
    # absolute folder, so PeftModel.from_pretrained finds it from anywhere.
    base_ref = str(cfg.resolve(cfg.model.base).resolve()) if cfg.base_is_local() else cfg.model.base
    peft_model.peft_config["default"].base_model_name_or_path = base_ref
    peft_model.peft_config["default"].revision = None if cfg.base_is_local() else cfg.model.revision
    return peft_model


def soul_of(peft_model) -> SO8Soul:
    return peft_model.base_model.model.lm_head.soul


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class make_progress:  # noqa: N801 (used like a function)
    """A tqdm bar showing phase, alpha, gate, loss and tokens/s."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)

    def update(self, m: StepMetrics) -> None:
        self.bar.set_postfix_str(
            f"{m.phase} alpha={m.alpha:+.3f} gate={m.gate:.3f} loss={m.loss:.4f} {m.tokens_per_s:.0f} tok/s",
            refresh=False,
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def train(cfg: Config) -> Path:
    """Run training as configured.

    Input: a validated Config. Output: the path of `checkpoints/final/`
    (plus `step_NNNNNN/` folders and `metrics.jsonl` under the run folder).
    Raises ModelError (base model), DataError (dataset, naming file and line).
    """
    trainer = Trainer(cfg)
    trainer.setup()
    return trainer.train()
