"""Stage 1, train: LoRA (on an NF4 base when configured) plus the SO(8) soul.

The life of a run: `setup` loads the base (4-bit NF4 through bitsandbytes
when configured), wraps it with LoRA, puts the soul in front of the LM head
and tokenizes the data; `resume` picks up the newest complete checkpoint of
the same config; `train` runs the optimizer steps with alpha set by the
phase-transition schedule, with the validation loss every `eval_every` steps;
`save_checkpoint` writes
`checkpoints/step_NNNNNN/` every `save_every` steps and `checkpoints/final/`
at the end. Each checkpoint folder holds the PEFT adapter
(adapter_config.json, adapter_model.safetensors), soul.safetensors, the
trainer state and checkpoint.json, which is written last into a temporary
folder that is then renamed: an interrupted write is never a checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import atomic_dir, atomic_write_text
from .checkpoint import (
    STATE_JSON, checkpoint_name, complete_steps, load_trainer_state, read_marker, remove_leftovers,
    save_trainer_state,
)
from .config import CHECKPOINT_MARKER, Config
from .data.prepare import read_prepared
from .data.tokenize import IGNORE, Example, collate, example_order, load_examples, pack
from .errors import DataError
from .families import family_of
from .hf import DTYPES, load_causal_lm, load_tokenizer, pick_device, resolve_base
from .integrity import folder_problem, folder_records
from .resources import require
from .soul import (
    SOUL_FILE, SO8Soul, SoulHead, alpha_at, load_soul, orthogonality_error, phase_at, save_soul, sigmoid,
)
from .tensors import return_freed_memory_eagerly


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
    val_loss: float | None = None  # every train.eval_every steps and at the last step


class Trainer:
    """One training run, from a validated config to checkpoints on disk."""

    def __init__(self, cfg: Config, splits: dict[str, list[dict]], data_sha256: str, *, log=print):
        self.cfg = cfg
        self.splits = splits
        self.data_sha256 = data_sha256
        self.log = log
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"

    # -- setup -------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.run.seed)
        self.device = pick_device(cfg.train.device)
        self.dist = Distributed.from_env(self.device)
        if self.dist.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.base_dir = resolve_base(cfg)
        self.nf4 = use_nf4(cfg, self.device)
        compute = DTYPES[cfg.train.compute_dtype]
        if self.device.type == "cpu" and compute != torch.float32:
            compute = torch.float32  # bf16 matmuls on CPU are slow and gain nothing here
        self.compute_dtype = compute
        self.tokenizer = load_tokenizer(self.base_dir)
        self.examples, self.validation = self.tokenize_splits()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        model = load_causal_lm(
            self.base_dir, nf4=self.nf4, compute_dtype=compute, device=self.device,
            double_quant=cfg.train.double_quant,
            dtype=compute if self.device.type == "cuda" else torch.float32,
        )
        if cfg.data.packing and model.config._attn_implementation != "sdpa":
            raise DataError(f"data.packing: needs SDPA attention, which passes the block-diagonal mask as it is "
                            f"(this model uses {model.config._attn_implementation})")
        self.model = wrap_with_lora_and_soul(model, cfg, alpha=alpha_at(0, cfg.soul))
        self.anneal_end = cfg.soul.warmup_steps + cfg.soul.anneal_steps
        if cfg.train.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.soul = soul_of(self.model)
        self.base_ref = base_reference(cfg)
        lora_params = [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": lora_params, "lr": cfg.train.lr},
                {"params": [self.soul.generator], "lr": cfg.soul.lr or cfg.train.lr},
                # alpha gets a gradient only with soul.learn_alpha, after the anneal
                {"params": [self.soul.alpha], "lr": cfg.soul.lr or cfg.train.lr, "weight_decay": 0.0},
            ],
            weight_decay=cfg.train.weight_decay,
        )
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        n_lora = sum(p.numel() for p in lora_params)
        self.log(
            f"[train] base {self.base_dir.name} on {self.device} ({'NF4' if self.nf4 else 'full precision'}), "
            f"{len(self.examples)} {'packed windows' if cfg.data.packing else 'examples'}, "
            f"{len(self.validation)} validation, {n_lora:,} LoRA + {self.soul.generator.numel():,} soul parameters"
        )

    def tokenize_splits(self) -> tuple[list[Example], list[Example]]:
        """Train examples (packed into windows with data.packing) and validation examples.

        Over-long conversations follow data.overlong; the counts are logged.
        Raises DataError when no training example is left.
        """
        d = self.cfg.data
        counts: Counter = Counter()
        train = load_examples(self.splits["train"], self.tokenizer, d.max_length, d.overlong, counts)
        validation = load_examples(self.splits["validation"], self.tokenizer, d.max_length, d.overlong, counts)
        if counts:
            self.log(f"[train] over-long examples (data.max_length {d.max_length}, data.overlong {d.overlong}): "
                     f"{counts['truncated']} truncated, {counts['dropped']} dropped")
        if not train:
            raise DataError(f"{self.cfg.prepared_dir / 'train.jsonl'}: no example fits data.max_length "
                            f"({d.max_length} tokens)")
        return (pack(train, d.max_length) if d.packing else train), validation

    def validation_loss(self) -> float | None:
        """Mean loss per trained token over the validation split, dropout off; None without one.

        The model stays in train mode (an eval-mode forward through bitsandbytes'
        Linear4bit on CPU breaks LoRA gradients for good): only dropout is turned off.
        """
        if not self.validation:
            return None
        dropouts = [m for m in self.model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
        for m in dropouts:
            m.eval()
        bs = self.cfg.train.batch_size
        batches = [collate(self.validation[i:i + bs], self.pad_id) for i in range(0, len(self.validation), bs)]
        total = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        loss = 0.0
        try:
            with torch.no_grad(), self.autocast():
                for b in batches:
                    loss += self.model(**{k: v.to(self.device) for k, v in b.items()}, num_items_in_batch=total).loss.item()
        finally:
            for m in dropouts:
                m.train()
        return loss

    def autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=self.compute_dtype,
            enabled=self.device.type == "cuda" and self.compute_dtype != torch.float32,
        )

    def step_examples(self, step: int) -> list[list[Example]]:
        """This process's micro-batches of optimizer step `step` (0-based).

        The step's examples are split into micro-batches and across processes
        so that N processes see exactly what one process with an N times
        bigger batch sees.
        """
        t, world, rank = self.cfg.train, self.dist.world, self.dist.rank
        bs = t.batch_size
        order = example_order(len(self.examples), step, bs * t.grad_accum * world, self.cfg.run.seed)
        return [[self.examples[i] for i in order[(m * world + rank) * bs:(m * world + rank + 1) * bs]]
                for m in range(t.grad_accum)]

    def alpha_is_learned(self, step: int) -> bool:
        """With soul.learn_alpha, alpha trains once the schedule has reached its target."""
        return self.cfg.soul.learn_alpha and step >= self.anneal_end

    # -- resume --------------------------------------------------------------
    def resume(self) -> int:
        """Continue from the newest complete checkpoint of this same config.

        Returns the step to start from (0 for a fresh run). Checkpoints of a
        different config are stale: they are removed so they cannot mix with
        this run's. Temporary folders left by a killed run are removed too.
        """
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        digest = self.cfg.section_digest("train")
        if self.dist.is_main:
            remove_leftovers(self.ckpt_dir)
            for _, folder, marker in complete_steps(self.ckpt_dir):
                if marker.get("train_config_sha256") != digest or marker.get("data_sha256") != self.data_sha256:
                    self.log(f"[train] removing {folder.name}: it was trained with another config")
                    shutil.rmtree(folder)
                elif problem := folder_problem(folder, CHECKPOINT_MARKER, full=True):
                    self.log(f"[train] removing {folder.name}: damaged ({problem})")
                    shutil.rmtree(folder)
        self.dist.barrier()
        latest = None
        for step, folder, _ in complete_steps(self.ckpt_dir):
            if (folder / STATE_JSON).is_file():
                latest = (step, folder)
        if latest is None:
            return 0
        step, folder = latest
        set_peft_model_state_dict(self.model, load_file(str(folder / "adapter_model.safetensors")))
        saved = load_soul(folder / SOUL_FILE)
        with torch.no_grad():
            self.soul.generator.copy_(saved.generator)
        self.soul.set_alpha(saved.alpha)
        restored = load_trainer_state(folder, self.optimizer)
        self.log(f"[train] resuming from {folder.name} (step {restored} of {self.cfg.train.steps})")
        return restored

    # -- train -------------------------------------------------------------
    def train(self) -> Path:
        cfg, t = self.cfg, self.cfg.train
        first = self.resume()
        metrics_path = self.run_dir / "metrics.jsonl"
        kept = read_metrics(metrics_path, up_to=first)
        self.dist.barrier()  # every process has read the metrics before the main one rewrites them
        if self.dist.is_main:
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        metrics = metrics_path.open("a", encoding="utf-8") if self.dist.is_main else open(os.devnull, "w")
        start = time.perf_counter() - (kept[-1]["elapsed_s"] if kept else 0.0)
        autocast = self.autocast()
        progress = make_progress(t.steps, initial=first, enabled=self.dist.is_main)
        try:
            for step in range(first, t.steps):
                if self.alpha_is_learned(step):
                    if not self.soul.alpha.requires_grad:  # learning starts from the target
                        if step == self.anneal_end:
                            self.soul.set_alpha(cfg.soul.alpha_target)
                        self.soul.alpha.requires_grad_(True)
                else:
                    self.soul.set_alpha(alpha_at(step, cfg.soul))
                alpha = self.soul.alpha.item()
                lr_scale = min(1.0, (step + 1) / t.lr_warmup_steps) if t.lr_warmup_steps else 1.0
                for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
                    group["lr"] = base_lr * lr_scale

                t0 = time.perf_counter()
                micro = self.step_examples(step)
                batches = [collate(items, self.pad_id) for items in micro]
                # The loss is the mean over every trained token of the step, however
                # it is split into micro-batches and processes: each adds its sum / the total.
                n_trained = int(self.dist.sum(torch.tensor(
                    float(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)))))
                lm_loss, tokens = 0.0, sum(len(e.input_ids) for items in micro for e in items)
                for batch in batches:
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    with autocast:
                        out = self.model(**batch, num_items_in_batch=n_trained)
                    out.loss.backward()
                    lm_loss += out.loss.item()
                self.dist.sum_gradients(self.optimizer)
                lm_loss = float(self.dist.sum(torch.tensor(lm_loss)))
                tokens = int(self.dist.sum(torch.tensor(float(tokens))))
                if cfg.soul.ortho_weight:
                    ortho = orthogonality_error(self.soul.rotation())
                    (cfg.soul.ortho_weight * ortho.square()).backward()
                else:
                    with torch.no_grad():
                        ortho = orthogonality_error(self.soul.rotation())
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad],
                    t.max_grad_norm,
                )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

                dt = time.perf_counter() - t0
                evaluate = t.eval_every and ((step + 1) % t.eval_every == 0 or step + 1 == t.steps)
                row = StepMetrics(
                    step=step + 1, phase=phase_at(step, cfg.soul), alpha=alpha,
                    gate=sigmoid(alpha),
                    loss=lm_loss + cfg.soul.ortho_weight * ortho.item() ** 2, lm_loss=lm_loss,
                    ortho_error=ortho.item(), lr=self.optimizer.param_groups[0]["lr"],
                    grad_norm=float(grad_norm), tokens_per_s=tokens / dt if dt > 0 else 0.0,
                    elapsed_s=time.perf_counter() - start,
                    val_loss=self.validation_loss() if evaluate else None,
                )
                if self.dist.is_main:
                    metrics.write(json.dumps(row.__dict__) + "\n")
                    metrics.flush()
                    progress.update(row)
                test_kill_point(f"step:{step + 1}")
                if (step + 1) % t.save_every == 0 or step + 1 == t.steps:
                    self.save_checkpoint(step + 1, checkpoint_name(step + 1))
        finally:
            progress.close()
            metrics.close()
        final = self.save_checkpoint(t.steps, "final")
        self.dist.close()
        return final

    # -- save_checkpoint -----------------------------------------------------
    def save_checkpoint(self, step: int, name: str) -> Path:
        """Write one complete checkpoint folder atomically; returns its path."""
        # The soul in a checkpoint carries the alpha the schedule gives after
        # `step` steps (or the learned one): the model a user gets from it.
        if not self.alpha_is_learned(step):
            self.soul.set_alpha(alpha_at(step, self.cfg.soul))
        final = self.ckpt_dir / name
        if not self.dist.is_main:  # one process writes; the others wait for it
            self.dist.barrier()
            return final
        with atomic_dir(final) as tmp:
            self.model.save_pretrained(str(tmp), safe_serialization=True)
            canonical_adapter_config(tmp / "adapter_config.json")
            test_kill_point(f"save:{step}")
            save_soul(tmp / SOUL_FILE, self.soul, step)
            save_trainer_state(tmp, self.optimizer, step)
            atomic_write_text(tmp / CHECKPOINT_MARKER, json.dumps({
                "step": step,
                "alpha": self.soul.alpha.item(),
                "gate": self.soul.gate().item(),
                "base": self.base_ref,
                "revision": None if self.cfg.base_is_local() else self.cfg.model.revision,
                "quantization": "nf4" if self.nf4 else "none",
                # What fuse needs to rebuild the exact NF4 weights the adapter saw.
                "nf4": {"load_dtype": str(self.compute_dtype).removeprefix("torch."),
                        "double_quant": self.cfg.train.double_quant, "blocksize": 64} if self.nf4 else None,
                "train_config_sha256": self.cfg.section_digest("train"),
                "data_sha256": self.data_sha256,  # the prepared dataset trained on (its data.json)
                # sha256 and size of each file: damage is found before fuse or a resume reads it.
                "files": folder_records(tmp),
            }, indent=1) + "\n")
        self.log(f"[train] wrote {final}")
        self.dist.barrier()
        return final


@dataclass
class Distributed:
    """torchrun's view of this process (WORLD_SIZE, RANK, LOCAL_RANK); a no-op alone.

    Gradients are summed, not averaged, across processes: each process's loss
    is already its share of the mean over the whole step's tokens.
    """

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls, device: torch.device) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(world, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            t = t.to(self._device())
            dist.all_reduce(t)
        return t.cpu()

    def sum_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()

    def _device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def read_metrics(path: Path, up_to: int) -> list[dict]:
    """metrics.jsonl rows of steps <= up_to (what a resumed run keeps)."""
    if up_to == 0 or not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            break  # a line cut by a kill ends the usable part
        if row.get("step", 0) <= up_to:
            rows.append(row)
    return rows


def canonical_adapter_config(path: Path) -> None:
    """PEFT writes target_modules from a set, in an order that changes with each process's
    string hashing: sort it, so the same training writes the same bytes (and sha256)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def test_kill_point(point: str) -> None:
    """Test hook: AGIASI_TEST_KILL_AT=step:N or save:N kills the process there
    with SIGKILL, so tests can interrupt training at an exact moment."""
    if os.environ.get("AGIASI_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def wrap_with_lora_and_soul(model, cfg: Config, *, alpha: float):
    """PEFT LoRA on the configured modules (train.lora.target_modules, else the base family's),
    then the soul in front of the head.

    LoRA weights and the soul's generator are the only trainable parameters;
    the base and the LM head stay frozen.
    """
    from peft import LoraConfig, get_peft_model

    lora = cfg.train.lora
    targets = lora.target_modules or family_of(model.config.to_dict()).lora_targets
    peft_cfg = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(targets), bias="none", task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, peft_cfg)
    inner = peft_model.base_model.model
    head = inner.lm_head
    for p in head.parameters():
        p.requires_grad_(False)
    soul = SO8Soul(head.weight.shape[1], alpha=alpha, shared=cfg.soul.shared_block).to(head.weight.device)
    inner.lm_head = SoulHead(head, soul)
    base_ref = base_reference(cfg)
    peft_model.peft_config["default"].base_model_name_or_path = base_ref
    peft_model.peft_config["default"].revision = None if cfg.base_is_local() else cfg.model.revision
    return peft_model


def base_reference(cfg: Config) -> str:
    """The base as checkpoints name it: the hub id, or the absolute local folder,
    so that PeftModel.from_pretrained and `chat` find it from anywhere."""
    return str(cfg.resolve(cfg.model.base).resolve()) if cfg.base_is_local() else cfg.model.base


def soul_of(peft_model) -> SO8Soul:
    return peft_model.base_model.model.lm_head.soul


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class make_progress:  # noqa: N801 (used like a function)
    """A tqdm bar showing phase, alpha, gate, loss and tokens/s."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                        disable=not enabled)

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
    Resumes from the newest complete checkpoint of the same config; returns
    at once when `final/` already holds this config's result. Under torchrun
    (WORLD_SIZE > 1) each process trains on its share of every step.
    Reads the prepared dataset (`<run>/data/`), preparing it first when it is
    missing or stale (what `make data` does).
    Raises ModelError (base model), DataError (dataset, naming source and row).
    """
    splits, data_sha256 = read_prepared(cfg)
    final = cfg.final_checkpoint
    marker = read_marker(final)
    if (marker and marker.get("train_config_sha256") == cfg.section_digest("train")
            and marker.get("data_sha256") == data_sha256):
        print(f"[train] {final} is already trained with this config and data; nothing to do")
        return final
    require(cfg, "train")
    return_freed_memory_eagerly()
    trainer = Trainer(cfg, splits, data_sha256)
    trainer.setup()
    return trainer.train()
