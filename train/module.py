"""The Lightning module: contrastive training of an open_clip model.

Optimisation is manual (``automatic_optimization = False``) for one reason: gradient
accumulation must keep the contrastive batch whole. With ``accum_steps > 1`` each step first
embeds every micro-batch without gradients (the cache), then re-embeds one micro-batch at a
time with gradients and computes the loss of the *whole* batch with that slice live and the rest
cached, back-propagating each in turn. The summed gradient equals the full-batch gradient
(open_clip's ``--accum-freq`` scheme), where Lightning's ``accumulate_grad_batches`` would
silently shrink the set of negatives to one micro-batch. RNG state is replayed between the two
passes so dropout / patch dropout see the same masks (as GradCache's ``RandContext``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections import OrderedDict
from dataclasses import asdict
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import nn

from cliptune.data.decode import SKIP_REASONS
from cliptune.domains import ON_NONFINITE
from cliptune.eval.embed import EmbeddingCollector, evaluate_gathered
from cliptune.eval.runner import crosslingual_results
from cliptune.eval.zeroshot import DEFAULT_TEMPLATES
from cliptune.faults import fault_point
from cliptune.log import get_logger
from cliptune.train.optim import OptimConfig, build_optimizer, lr_lambda

log = get_logger(__name__)

# with on_nonfinite=skip, this many non-finite steps in a row end the run: the model has diverged
MAX_CONSECUTIVE_NONFINITE = 20


class NonFiniteError(FloatingPointError):
    """A non-finite loss, gradient or weight: the run stops before anything non-finite is saved."""


def nonfinite_entries(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``state`` holding NaN or inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


class _RngReplay:
    """Capture RNG state before a forward and replay it for the re-forward."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def replay(self):
        devices = list(range(torch.cuda.device_count())) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


class ByteLRU(OrderedDict):
    """The store of both frozen-feature caches: least-recently-used, bounded by ``max_bytes`` of payload (key
    bytes plus tensor bytes; Python's per-entry object overhead comes on top). When full it evicts the oldest
    entries one at a time, so a long run never loses the whole cache at once; an entry larger than the bound
    is not stored (the rest is kept). ``max_bytes=0`` stores nothing."""

    def __init__(self, max_bytes: int, owner: str = "ByteLRU") -> None:
        if max_bytes < 0:
            raise ValueError(f"{owner} max_bytes={max_bytes}: must be >= 0 (0 disables caching)")
        super().__init__()
        self.max_bytes = max_bytes
        self.nbytes = 0  # payload bytes held

    @staticmethod
    def entry_bytes(key: bytes, value: torch.Tensor) -> int:
        return len(key) + value.element_size() * value.nelement()

    def hit(self, key: bytes) -> torch.Tensor | None:
        """The value at ``key``, now the most recently used, or None."""
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = self.entry_bytes(key, value)
        if size > self.max_bytes:
            return  # could never fit: keep the rest of the cache instead of emptying it
        self[key] = value
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            old_key, old_value = self.popitem(last=False)
            self.nbytes -= self.entry_bytes(old_key, old_value)


class _FeatureStore:
    """What both frozen-feature caches expose of their :class:`ByteLRU` store."""

    store: ByteLRU
    entry_bytes = staticmethod(ByteLRU.entry_bytes)

    @property
    def max_bytes(self) -> int:
        return self.store.max_bytes

    @property
    def nbytes(self) -> int:
        return self.store.nbytes


class FrozenTextCache(_FeatureStore):
    """Pooled outputs of a frozen Hugging Face text tower, computed once per distinct caption.

    LiT-style runs lock the pretrained text transformer and train only its projection: the
    transformer then maps a caption to the same vector every step, so recomputing it is waste
    (on the CPU demo it is the largest cost after the image tower). Padding is trimmed before
    the transformer runs (attention-masked and mean/CLS pooling make the result identical).

    The store is a :class:`ByteLRU` of ``max_bytes``.
    """

    def __init__(self, text: nn.Module, max_bytes: int = 1 << 30) -> None:
        self.store = ByteLRU(max_bytes, "FrozenTextCache")
        self.text = text
        self.pad = text.config.pad_token_id

    @staticmethod
    def applies(model: nn.Module) -> bool:
        text = getattr(model, "text", None)
        return (
            text is not None
            and hasattr(text, "transformer") and hasattr(text, "pooler") and hasattr(text, "proj")
            and not any(p.requires_grad for p in text.transformer.parameters())
        )

    @torch.no_grad()
    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = tokens.cpu().numpy()
        keys = [r.tobytes() for r in rows]
        first: dict[bytes, int] = {}  # distinct key -> index of its first row, in one pass
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        # this batch's features, kept apart from the store: inserting the misses below may evict
        # hits (or earlier misses) of this same batch when it alone exceeds ``max_bytes``
        found: dict[bytes, torch.Tensor] = {}
        todo: list[bytes] = []
        for k in first:
            hit = self.store.hit(k)
            if hit is None:
                todo.append(k)
            else:
                found[k] = hit
        if todo:
            x = tokens[torch.tensor([first[k] for k in todo], device=tokens.device)]
            mask = x != self.pad
            length = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
            x, mask = x[:, :length], mask[:, :length].long()
            out = self.text.transformer(input_ids=x, attention_mask=mask)
            pooled = self.text.pooler(out, mask).float().cpu()
            for k, v in zip(todo, pooled):
                v = v.clone()  # own storage: a row view would pin the whole batch and hide its bytes
                found[k] = v
                self.store.put(k, v)
        return torch.stack([found[k] for k in keys]).to(tokens.device)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(tokens)
        proj = self.text.proj
        return proj(pooled.to(next(proj.parameters()).dtype)) if isinstance(proj, nn.Module) else pooled @ proj


class FrozenImageCache(_FeatureStore):
    """Features of a frozen image tower, computed once per distinct input image.

    A LiT-style run with a pretrained, locked image tower trains only what follows it: open_clip's
    timm towers keep their projection (``visual.head``) trainable over a frozen trunk, and a fully
    locked tower has nothing trainable at all. The trunk then maps an image tensor to the same
    features every epoch (BatchNorm in eval mode), so they are computed once. Entries are keyed by
    a hash of the input tensor's bytes: a cache hit is the same pixels, whatever the sample key, and
    augmented images simply miss (``cliptune.train.run`` trains a cached tower on the deterministic
    eval transform when ``data.augment=none``, where every epoch hits). The store is a :class:`ByteLRU` of
    ``max_bytes``, as ``FrozenTextCache``'s.
    """

    def __init__(self, visual: nn.Module, max_bytes: int = 1 << 30) -> None:
        self.store = ByteLRU(max_bytes, "FrozenImageCache")
        self.visual = visual
        trunk = getattr(visual, "trunk", None)
        self.trunk = trunk if isinstance(trunk, nn.Module) and isinstance(getattr(visual, "head", None), nn.Module) \
            and any(p.requires_grad for p in visual.head.parameters()) else visual
        self.hits = 0
        self.misses = 0

    @staticmethod
    def applies(model: nn.Module) -> bool:
        """A timm trunk with no trainable weight (its head may train), or a tower with none at all."""
        visual = getattr(model, "visual", None)
        if not isinstance(visual, nn.Module):
            return False
        trunk = getattr(visual, "trunk", None)
        timm_tower = isinstance(trunk, nn.Module) and isinstance(getattr(visual, "head", None), nn.Module)
        frozen = trunk if timm_tower else visual
        return not any(p.requires_grad for p in frozen.parameters())

    @staticmethod
    def keys(images: torch.Tensor) -> list[bytes]:
        """The cache key of each image of ``images`` [B, ...]: a hash of its bytes. The module takes them on
        the host before the batch is copied to the device (``image_key``), so no image comes back for it."""
        rows = images.detach().cpu().contiguous()
        return [hashlib.blake2b(r.numpy().tobytes(), digest_size=16).digest() for r in rows]

    @torch.no_grad()
    def features(self, images: torch.Tensor, keys: list[bytes] | None = None) -> torch.Tensor:
        keys = self.keys(images) if keys is None else keys
        found: dict[bytes, torch.Tensor] = {}
        todo: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            hit = self.store.hit(k)
            if hit is not None:
                found[k] = hit
            else:
                todo.setdefault(k, i)
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            self.trunk.eval()  # frozen: BatchNorm statistics and dropout off, so the features are fixed
            out = self.trunk(images[torch.tensor(list(todo.values()), device=images.device)]).float().cpu()
            for k, v in zip(todo, out):
                v = v.clone()
                found[k] = v
                self.store.put(k, v)
        return torch.stack([found[k] for k in keys]).to(images.device)

    def __call__(self, images: torch.Tensor, keys: list[bytes] | None = None) -> torch.Tensor:
        feats = self.features(images, keys)
        if self.trunk is self.visual:
            return feats
        head = self.visual.head
        return head(feats.to(next(head.parameters()).dtype))


def fit_validation_step(trainer: L.Trainer | None) -> int | None:
    """The global step of a validation that runs inside ``fit`` (not its sanity check), else None: a module
    keeps it with ``last_val`` so the final weights are not scored twice (``cliptune.train.run.validate_after_fit``)."""
    if trainer is None or trainer.state.fn != "fit" or trainer.sanity_checking:
        return None
    return int(trainer.global_step)


def nonfinite_on_any_rank(trainer: L.Trainer | None, *values: torch.Tensor | None) -> bool:
    """Whether any of ``values`` holds NaN/inf on any rank: one flag on the device, summed over the
    ranks, one host sync. Every rank gets the same answer, so all of them stop (or skip) together: a
    rank that raised alone would leave the others waiting in the next collective until the process
    group times out."""
    present = [v.detach() for v in values if v is not None]
    bad = torch.zeros((), device=present[0].device if present else None)  # on the device: no host copy per step
    for v in present:
        bad = bad + (~torch.isfinite(v)).any().float()
    if trainer is not None and trainer.world_size > 1:
        bad = trainer.strategy.reduce(bad, reduce_op="sum")
    return bool(bad)


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together (one fused kernel where torch has it)."""
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


def seed_step(seed: int, step: int, rank: int, device: torch.device) -> int:
    """Seed torch's RNG for training step ``step`` of ``rank`` and return the seed: the RNG state is a function
    of the step, not of the process's history (validation loaders, a restart), so a resumed run draws exactly
    what the uninterrupted one drew. Both training modules call it first thing in ``training_step``."""
    step_seed = (seed * 1_000_003 + step * 4_099 + rank) % 2**63
    if device.type == "cpu":
        # torch.manual_seed also queues the seeding of every accelerator runtime not yet started, with a
        # stack trace each (~0.15 ms); a CPU run draws from the CPU generator only
        torch.default_generator.manual_seed(step_seed)
    else:
        torch.manual_seed(step_seed)
    return step_seed


def optimizer_and_schedule(module: L.LightningModule, model: nn.Module, cfg: OptimConfig) -> dict[str, Any]:
    """``configure_optimizers``' answer for both training modules: AdamW over ``model``'s trainable parameters
    (``build_optimizer``) and the warm-up + cosine schedule over the run's steps, stepped every step."""
    trainer = module._trainer
    # fused AdamW unscales inside its step, which an fp16 GradScaler with clipping cannot use
    scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
    opt = build_optimizer(model, cfg, fused=None if scaler is None else False)
    total = int(trainer.estimated_stepping_batches) if trainer is not None else 10_000
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    # "name": the LearningRateMonitor's prefix, so each group logs as train/lr/<group name>
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "train/lr"}}


def nonfinite_problem(module: L.LightningModule, loss: torch.Tensor) -> tuple[str | None, list[nn.Parameter],
                                                                             torch.Tensor | None]:
    """What is not finite after backward (the same answer on every rank) or None, with the parameters of
    ``module`` that have a gradient and the gradients' total norm (reused for clipping; None with an fp16
    GradScaler).

    One flag on the device for the loss and the gradient norm, summed over ranks (a rank alone
    in trouble takes the others along: all step or none), and one host sync to read it; the
    message is only worked out when something is wrong."""
    trainer = module._trainer
    # (with an fp16 GradScaler, inf gradients are expected now and then: the scaler skips those steps)
    check_grads = trainer is None or getattr(trainer.precision_plugin, "scaler", None) is None
    params = [p for p in module.parameters() if p.grad is not None] if check_grads else []
    norm = _total_norm([p.grad for p in params]) if params else None
    if not nonfinite_on_any_rank(trainer, loss, norm):
        return None, params, norm
    if not bool(torch.isfinite(loss)):
        return f"the loss is {float(loss)}", params, norm
    if norm is not None and not bool(torch.isfinite(norm)):
        names = [n for n, p in module.named_parameters()
                 if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        return f"the gradient norm is {float(norm)} ({len(names)} tensors, e.g. {', '.join(names[:3])})", params, norm
    return "the loss or gradient is not finite on another rank", params, norm


def nonfinite_causes(cfg: OptimConfig) -> str:
    return (f"Likely causes: a learning rate too high (optim.lr={cfg.lr}), no gradient clipping "
            f"(optim.grad_clip={cfg.grad_clip}), fp16 overflow (use bf16-mixed), or broken input.")


def nonfinite_error(step: int, problem: str, cfg: OptimConfig, skip_hint: bool = False) -> NonFiniteError:
    """The error that stops a run at a non-finite step (``step``: the one that would have been taken)."""
    return NonFiniteError(
        f"step {step}: {problem}. Training stopped before the update: no weight, checkpoint or export holds "
        f"a non-finite value; the last checkpoint is from before this step. {nonfinite_causes(cfg)}"
        + (" To drop such steps instead, set on_nonfinite=skip." if skip_hint else ""))


def refuse_nonfinite_checkpoint(checkpoint: dict[str, Any]) -> None:
    """Raise before a checkpoint holding NaN/inf weights is written (``on_save_checkpoint`` of both modules)."""
    bad = nonfinite_entries(checkpoint.get("state_dict", {}))
    if bad:
        raise NonFiniteError(f"refusing to save a checkpoint with non-finite weights ({len(bad)} tensors, e.g. "
                             f"{', '.join(bad[:3])})")


# A trimmed text batch keeps a multiple of this many token columns: few distinct shapes for torch.compile
# and the kernels, at most 7 padding columns computed.
TEXT_TRIM_MULTIPLE = 8


def trimmable_text(model: nn.Module) -> bool:
    """Whether ``model`` is open_clip's ``CLIP`` with its built-in causal text tower pooled at the end-of-text
    token (``argmax`` / ``eos``): then no output depends on a token after the last end-of-text token of a
    batch, and those padding columns can be left out with no change to any feature or gradient."""
    mask = getattr(model, "attn_mask", None)
    if not isinstance(model, CLIP) or mask is None or getattr(model, "text_pool_type", None) not in ("argmax", "eos"):
        return False
    if getattr(model, "text_pool_type", None) == "eos" and getattr(model, "text_eos_id", None) is None:
        return False
    future = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.equal(torch.isneginf(mask), future)) and bool((mask[~future] == 0).all())


def text_columns_needed(tokens: torch.Tensor, pool_type: str, eos_id: int | None = None,
                        multiple: int = TEXT_TRIM_MULTIPLE) -> int:
    """Leading token columns of ``tokens`` [..., L] that a causal text tower pooled at the end-of-text token
    reads: through the last pooled position of any row, rounded up to ``multiple`` (at most L)."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    length = tokens.shape[-1]
    if flat.shape[0] == 0:
        return length
    pooled = flat.argmax(dim=-1) if pool_type == "argmax" else (flat == eos_id).int().argmax(dim=-1)
    needed = int(pooled.max()) + 1
    return min(length, -(-needed // multiple) * multiple)


def batch_size_of(batch: dict) -> int:
    """Samples in a batch (``TrainThroughput``'s ``batch_size_fn`` in configs/callbacks/throughput.yaml)."""
    return int(batch["image"].shape[0])


class ContrastiveModule(L.LightningModule):
    """Trains ``model`` (an open_clip CLIP) with ``loss_fn`` (``ClipLoss`` or ``SigLipLoss``).

    Args:
        model: open_clip model with ``encode_image``, ``encode_text``, ``logit_scale`` (log-space)
            and optionally ``logit_bias``.
        loss_fn: a cliptune loss; ``loss_fn(img [B,D], txt [B,D], scale, bias, ...)``.
        optim: optimiser and schedule settings.
        accum_steps: micro-batches per optimiser step (the whole batch stays one contrastive batch).
        max_logit_scale: clamp of the log-space temperature after each step (log 100).
        model_spec: the ``build_model`` kwargs, stored in checkpoints so a run can be reloaded.
        lora: LoRA settings applied to ``model`` (stored for reload and export).
        compile: torch.compile both towers.
        val_batch_size: batch size of the validation loss over each validation set.
        cache_frozen_text: when the Hugging Face text transformer is fully locked, compute each
            caption's pooled features once (``FrozenTextCache``) and keep the tower in eval mode.
        cache_frozen_image: when the image trunk is fully locked (a timm tower whose projection
            trains, or a tower locked whole), compute each training image's features once
            (``FrozenImageCache``) and keep the trunk in eval mode.
        tokenizer, zeroshot_templates: with both, validation sets whose samples carry a label
            also report zero-shot accuracy over their classes (``val/<set>/zs_top1`` ...).
        seed: each training step seeds torch's RNG from (seed, step, rank), so dropout and other
            random layers draw the same numbers in a resumed run as in an uninterrupted one.
        on_nonfinite: ``"error"`` stops at the first non-finite loss or gradient with a message
            naming the step (nothing non-finite is ever stepped into the weights or saved);
            ``"skip"`` drops such a step (no optimiser or scheduler step) and counts it in
            ``train/nonfinite_steps``; 20 in a row still stop the run.
        trim_text_padding: for open_clip's built-in causal text tower (:func:`trimmable_text`), batches
            leave out the trailing padding columns no output depends on (:func:`text_columns_needed`),
            before they are copied to the device: the same features and gradients for fewer FLOPs
            (CLIP's 77-token context against captions of ~10-20 tokens).

    Costs beyond the model are kept off the step: AdamW is fused on CPU and CUDA
    (:func:`cliptune.train.optim.build_optimizer`), the gradient norm is computed once for the non-finite
    check and the clipping, the per-step metrics other than the loss are only logged on the steps the
    loggers write, and on CUDA a convolutional image tower runs channels-last.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optim: OptimConfig | None = None,
        accum_steps: int = 1,
        max_logit_scale: float | None = math.log(100),
        model_spec: dict | None = None,
        lora: dict | None = None,
        compile: bool = False,
        val_batch_size: int = 256,
        cache_frozen_text: bool = True,
        cache_frozen_image: bool = False,
        tokenizer: Callable | None = None,
        zeroshot_templates: list[str] | None = None,
        on_nonfinite: str = "error",
        seed: int = 0,
        trim_text_padding: bool = True,
    ) -> None:
        super().__init__()
        self.seed = int(seed)
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite={on_nonfinite!r}: must be one of {', '.join(ON_NONFINITE)}")
        self.on_nonfinite = on_nonfinite
        self.nonfinite_steps = 0
        self._nonfinite_run = 0
        # samples the training loaders skipped on this rank, per reason (SKIP_REASONS), whole run;
        # kept on the batches' device, so counting them costs the training step no host sync
        self.skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        self.automatic_optimization = False
        self.model = model
        self.loss_fn = loss_fn
        self.optim_cfg = optim or OptimConfig()
        if accum_steps < 1:
            raise ValueError(f"accum_steps={accum_steps}: must be >= 1")
        self.accum_steps = int(accum_steps)
        self.max_logit_scale = max_logit_scale
        self.val_batch_size = val_batch_size
        self.uses_bias = bool(getattr(loss_fn, "needs_bias", False))  # the loss declares it (SigLipLoss)
        self.uses_groups = getattr(loss_fn, "positives", "pair") == "group"
        bias = getattr(model, "logit_bias", None)
        if self.uses_bias and bias is None:
            raise ValueError(
                f"{type(loss_fn).__name__} needs model.logit_bias; set loss.add_logit_bias=true or use loss=clip"
            )
        if not self.uses_bias and bias is not None and bias.requires_grad:
            # A parameter that receives no gradient breaks DDP's reducer (open_clip issue 1076):
            # the softmax loss never reads the bias, so freeze it.
            bias.requires_grad_(False)
            log.info("logit_bias frozen: %s does not use it", type(loss_fn).__name__)
        if compile:
            for tower in ("visual", "transformer", "text"):
                m = getattr(model, tower, None)
                if isinstance(m, nn.Module):
                    m.compile()
        self.save_hyperparameters(
            {
                "model_spec": model_spec,
                "lora": lora,
                "optim": asdict(self.optim_cfg),
                "accum_steps": self.accum_steps,
                "loss": type(loss_fn).__name__,
                "max_logit_scale": max_logit_scale,
            }
        )
        self.trim_text = bool(trim_text_padding) and trimmable_text(model)
        self.channels_last = False  # set in setup(): CUDA and a convolutional image tower
        self.text_cache = FrozenTextCache(model.text) if cache_frozen_text and FrozenTextCache.applies(model) else None
        if self.text_cache is not None:
            log.info("text transformer is frozen: caching its pooled features per caption")
        self.image_cache = (FrozenImageCache(model.visual) if cache_frozen_image and FrozenImageCache.applies(model)
                            else None)
        if self.image_cache is not None:
            log.info("image trunk is frozen: caching its features per training image")
        self.tokenizer = tokenizer
        # None: the default prompts; an empty list: no zero-shot accuracy
        self.zeroshot_templates = list(DEFAULT_TEMPLATES if zeroshot_templates is None else zeroshot_templates)
        self._val_store: dict[int, Any] = {}
        self.val_set_names: list[str] = []
        self.last_val: dict[str, dict] = {}
        # the global step of the validation that ran during fit and gave last_val (None: not one of fit's)
        self.last_val_fit_step: int | None = None
        # Hugging Face towers arrive in eval mode (from_pretrained) and Lightning keeps the mode
        # it finds: train the whole model as open_clip does (dropout on in unlocked or LoRA-adapted
        # layers), except a cached frozen text transformer (see train() below).
        self.train()

    # ----------------------------------------------------------------- training
    def train(self, mode: bool = True):
        super().train(mode)
        if self.text_cache is not None:
            self.model.text.transformer.eval()  # frozen tower: no dropout, so features are cacheable
        if getattr(self, "image_cache", None) is not None:
            self.image_cache.trunk.eval()  # the same for a cached image trunk (BatchNorm statistics too)
        return self

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        visual = getattr(self.model, "visual", None)
        # A ViT has one convolution (its patch embedding): channels-last pays for convolutional towers only.
        convs = sum(isinstance(m, nn.Conv2d) for m in visual.modules()) if isinstance(visual, nn.Module) else 0
        if device.type == "cuda" and convs > 1 and not self.channels_last:
            visual.to(memory_format=torch.channels_last)
            self.channels_last = True

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if self.trim_text and isinstance(batch, dict):
            batch = self.trim_text_batch(batch)  # on the host, before the copy: no device sync, fewer bytes
        if self.image_cache is not None and self.training and isinstance(batch, dict) \
                and isinstance(batch.get("image"), torch.Tensor) and batch["image"].device.type == "cpu":
            batch = {**batch, "image_key": self.image_cache.keys(batch["image"])}  # hashed here, not copied back
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def trim_text_batch(self, batch: dict) -> dict:
        """``batch`` with ``text`` [B, L] and ``neg_text`` [B, K, L] cut to the columns the text tower reads
        (host tensors only: reading the end-of-text positions of device tensors would wait for the device)."""
        out = dict(batch)
        pool, eos = self.model.text_pool_type, getattr(self.model, "text_eos_id", None)
        for key in ("text", "neg_text"):
            tokens = out.get(key)
            if isinstance(tokens, torch.Tensor) and tokens.device.type == "cpu" and tokens.ndim >= 2:
                out[key] = tokens[..., : text_columns_needed(tokens, pool, eos)]
        return out

    def encode_text(self, texts: torch.Tensor) -> torch.Tensor:
        if self.text_cache is not None:
            return torch.nn.functional.normalize(self.text_cache(texts), dim=-1)
        if self.trim_text and texts.shape[-1] < self.model.positional_embedding.shape[0]:
            return self._encode_trimmed_text(texts)
        return self.model.encode_text(texts, normalize=True)

    def _encode_trimmed_text(self, texts: torch.Tensor) -> torch.Tensor:
        """``CLIP.encode_text`` on the first L token columns: the positional embedding and the causal mask
        cut to L (open_clip's own forward adds the full-length ones). tests/test_module.py checks it
        against ``CLIP.encode_text`` on the untrimmed tokens, features and gradients."""
        m = self.model
        n = texts.shape[-1]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(texts).to(cast_dtype) + m.positional_embedding[:n].to(cast_dtype)  # [B, L, W]
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:n, :n]))
        x = text_global_pool(x, texts, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
        return torch.nn.functional.normalize(x, dim=-1)

    def encode(self, images: torch.Tensor, texts: torch.Tensor, neg: torch.Tensor | None = None,
               image_keys: list[bytes] | None = None):
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.image_cache is not None and self.training:
            img = torch.nn.functional.normalize(self.image_cache(images, image_keys), dim=-1)  # [b, D]
        else:
            img = self.model.encode_image(images, normalize=True)  # [b, D]
        txt = self.encode_text(texts)  # [b, D]
        negf = None
        if neg is not None:
            b, k, l = neg.shape
            negf = self.encode_text(neg.reshape(b * k, l)).reshape(b, k, -1)  # [b, K, D]
        return img, txt, negf

    def _scale_bias(self, live: bool):
        """Temperature and bias; with ``live=False`` they pass no gradient but stay in the graph
        (DDP must see every trainable parameter take part in each backward)."""
        s = self.model.logit_scale.exp()
        b = getattr(self.model, "logit_bias", None) if self.uses_bias else None
        if not live:
            s = s.detach() + 0.0 * s
            if b is not None:
                b = b.detach() + 0.0 * b
        return s, b

    def _loss(self, img, txt, negf, batch, live_scale: bool):
        s, b = self._scale_bias(live_scale)
        kw: dict[str, Any] = {}
        if self.uses_groups:
            kw["group_ids"] = batch["group"]
        if negf is not None:
            kw["neg_text_features"] = negf
            kw["neg_mask"] = batch["neg_mask"]
        return self.loss_fn(img, txt, s, b, **kw) if b is not None else self.loss_fn(img, txt, s, **kw)

    def contrastive_backward(self, batch: dict, backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Loss of the whole batch and its gradient, in ``accum_steps`` micro-batches.

        Returns the (detached) loss; gradients are accumulated into ``.grad`` via ``backward``.
        """
        images, texts = batch["image"], batch["text"]
        neg = batch.get("neg_text")
        keys = batch.get("image_key")  # FrozenImageCache keys, taken on the host (transfer_batch_to_device)
        n = self.accum_steps
        if n == 1:
            img, txt, negf = self.encode(images, texts, neg, keys)
            loss = self._loss(img, txt, negf, batch, live_scale=True)
            backward(loss)
            return loss.detach()
        B = images.shape[0]
        if B % n:
            raise ValueError(f"batch size {B} is not divisible by accum_steps={n}")
        m = B // n
        cuts = [(i * m, (i + 1) * m) for i in range(n)]
        rngs, cache_i, cache_t, cache_n = [], [], [], []
        with torch.no_grad():
            for s, e in cuts:
                rngs.append(_RngReplay())
                i, t, ng = self.encode(images[s:e], texts[s:e], None if neg is None else neg[s:e],
                                       None if keys is None else keys[s:e])
                cache_i.append(i)
                cache_t.append(t)
                cache_n.append(ng)
        value = None
        for j, (s, e) in enumerate(cuts):
            with rngs[j].replay():
                i, t, ng = self.encode(images[s:e], texts[s:e], None if neg is None else neg[s:e],
                                       None if keys is None else keys[s:e])
            img = torch.cat(cache_i[:j] + [i] + cache_i[j + 1:])
            txt = torch.cat(cache_t[:j] + [t] + cache_t[j + 1:])
            negf = None if neg is None else torch.cat(cache_n[:j] + [ng] + cache_n[j + 1:])
            # The temperature's gradient must be counted once, not once per micro-batch.
            loss = self._loss(img, txt, negf, batch, live_scale=(j == 0))
            sync = contextlib.nullcontext()
            if j < n - 1 and self._trainer is not None:
                sync = getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)()
            with sync:
                backward(loss)
            if value is None:
                value = loss.detach()
        return value

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        seed_step(self.seed, self.global_step, self.global_rank, self.device)
        opt = self.optimizers()
        sch = self.lr_schedulers()
        skipped = batch.get("skipped")
        if skipped is not None:
            self.skipped = self.skipped.to(skipped.device) + skipped.detach().long().reshape(-1)
        opt.zero_grad(set_to_none=True)
        loss = self.contrastive_backward(batch, self.manual_backward)
        problem, params, norm = nonfinite_problem(self, loss)
        if problem is not None:
            self._on_nonfinite(problem, opt, batch)
            return loss
        self._nonfinite_run = 0
        if self.optim_cfg.grad_clip:
            self._clip(opt, params, norm)
        opt.step()
        if sch is not None:
            sch.step()
        if self.max_logit_scale is not None:
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, self.max_logit_scale)
        self._log_train(batch, loss)
        return loss

    def _clip(self, opt, params: list[nn.Parameter], norm: torch.Tensor | None) -> None:
        """Clip the gradient norm to ``optim.grad_clip``. With the norm at hand (no GradScaler to unscale
        first) and whole gradients on each rank (one device or DDP), scale by it directly, as
        ``clip_grad_norm_`` does after computing it again; otherwise Lightning clips."""
        max_norm = float(self.optim_cfg.grad_clip)
        with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)  # torch >= 2.6
        if (norm is not None and with_norm is not None
                and isinstance(self.trainer.strategy, (SingleDeviceStrategy, DDPStrategy))):
            with_norm(params, max_norm, norm)
            return
        self.clip_gradients(opt, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    def _on_nonfinite(self, problem: str, opt, batch: dict) -> None:
        opt.zero_grad(set_to_none=True)
        step = self.global_step + 1
        cause = nonfinite_causes(self.optim_cfg)
        if self.on_nonfinite == "error":
            raise nonfinite_error(step, problem, self.optim_cfg, skip_hint=True)
        self.nonfinite_steps += 1
        self._nonfinite_run += 1
        if self._nonfinite_run >= MAX_CONSECUTIVE_NONFINITE:
            raise NonFiniteError(f"step {step}: {self._nonfinite_run} non-finite steps in a row ({problem}): "
                                 f"the run has diverged. {cause}")
        if self.nonfinite_steps <= 5 or self.nonfinite_steps % 100 == 0:
            log.warning("step %d: %s; step skipped (on_nonfinite=skip, %d so far)", step, problem, self.nonfinite_steps)
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=batch_size_of(batch))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        refuse_nonfinite_checkpoint(checkpoint)
        per_rank = self.skipped.cpu().unsqueeze(0)
        if self._trainer is not None and self.trainer.world_size > 1:
            per_rank = self.all_gather(self.skipped.to(self.device)).reshape(-1, len(SKIP_REASONS)).cpu()
        checkpoint["cliptune"] = {"skipped_per_rank": per_rank, "nonfinite_steps": self.nonfinite_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("cliptune") or {}
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        per_rank = state.get("skipped_per_rank")
        if per_rank is not None and per_rank.shape[-1] < len(SKIP_REASONS):
            # written before newer skip reasons existed (they are appended): none of those were counted then
            per_rank = torch.nn.functional.pad(per_rank, (0, len(SKIP_REASONS) - per_rank.shape[-1]))
        if per_rank is not None:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            world = self.trainer.world_size if self._trainer is not None else 1
            # a different number of ranks: the totals live on rank 0, so the run's sum stays right
            self.skipped = (per_rank[rank].clone() if len(per_rank) == world
                            else per_rank.sum(0) if rank == 0 else torch.zeros_like(per_rank[0]))

    def skipped_totals(self) -> dict[str, int]:
        """Training samples skipped so far, per reason, summed over ranks (a collective under DDP)."""
        total = self.skipped
        if self._trainer is not None and self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(self.skipped.to(self.device), reduce_op="sum")
        return dict(zip(SKIP_REASONS, (int(x) for x in total.cpu().tolist())))

    def _logged_step(self) -> bool:
        """Whether the loggers write this step's metrics (Lightning's own test; True if it cannot be read)."""
        if self.trainer.fast_dev_run:
            return True  # Lightning writes every step then
        return bool(getattr(getattr(self.trainer, "_logger_connector", None), "should_update_logs", True))

    def _log_train(self, batch: dict, loss: torch.Tensor) -> None:
        # lr per parameter group and samples/s: callbacks (configs/callbacks/lr_monitor.yaml, throughput.yaml)
        bs = batch_size_of(batch)
        logged = self._logged_step()
        # the progress bar shows every step's loss; the mean over ranks (a collective) only where it is written
        self.log("train/loss", loss, prog_bar=True, sync_dist=logged, batch_size=bs)
        if not logged:
            return  # nothing below is shown or written on this step
        self.log("train/logit_scale", self.model.logit_scale.detach().exp(), batch_size=bs)
        if getattr(self.model, "logit_bias", None) is not None:
            self.log("train/logit_bias", self.model.logit_bias.detach().squeeze(), batch_size=bs)
        # Cumulative over the run (and summed over ranks in one collective): any logged row holds
        # every skip so far, whichever steps get logged.
        totals = self.skipped.to(self.device, torch.float32)
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        self.log("data/skipped", totals.sum(), batch_size=bs)
        for reason, value in zip(SKIP_REASONS, totals):
            self.log(f"data/skipped/{reason}", value, batch_size=bs)
        if self.nonfinite_steps:
            self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=bs)

    def configure_optimizers(self):
        return optimizer_and_schedule(self, self.model, self.optim_cfg)

    # ----------------------------------------------------------------- validation
    def on_validation_start(self) -> None:
        fault_point("validation.start")

    def on_validation_end(self) -> None:
        fault_point("validation.end")

    def on_validation_epoch_start(self) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        self.val_set_names = list(getattr(dm, "val_set_names", None) or [])
        self._val_store = {}
        self._collector_cls = EmbeddingCollector

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        # No collective op here: ranks may hold different numbers of validation batches.
        col = self._val_store.get(dataloader_idx)
        if col is None:
            col = self._val_store[dataloader_idx] = self._collector_cls()
        col.add_batch(self.model, batch, encode_text=self.encode_text)

    def on_validation_epoch_end(self) -> None:
        n_sets = max(len(self.val_set_names), (max(self._val_store) + 1) if self._val_store else 0)
        dm = self.trainer.datamodule if self._trainer is not None else None
        langs = [str(x) for x in (getattr(dm, "val_caption_langs", None) or [])]
        results: dict[str, dict] = {}
        by_language: dict[str, dict[str, dict]] = {}  # set -> {lang: its gathered embeddings}
        for idx in range(n_sets):
            name = self.val_set_names[idx] if idx < len(self.val_set_names) else f"set{idx}"
            col = self._val_store.get(idx) or self._collector_cls()
            zs = None
            if self.tokenizer is not None and self.zeroshot_templates:
                zs = (lambda texts: self.encode_text(self.tokenizer(texts).to(self.device)).float(),
                      self.zeroshot_templates)
            data = col.gather()  # a collective: every rank, every set
            res = evaluate_gathered(data, self.loss_fn, self._scale_bias(False), batch_size=self.val_batch_size,
                                    name=f"val set {name!r}", zeroshot=zs)
            results[name] = res
            base, _, lang = name.rpartition(":")
            if len(langs) > 1 and base and lang in langs:
                by_language.setdefault(base, {})[lang] = data
        # Sets scored once per language (data.val_caption_langs): their cross-lingual consistency, from the
        # embeddings just computed (every rank holds them all: no further pass over the data)
        for base, gathered in by_language.items():
            results.update(crosslingual_results(base, gathered))
        for name, res in results.items():
            for k, v in res["metrics"].items():
                self.log(f"val/{name}/{k}", float(v), sync_dist=False, add_dataloader_idx=False)
        self.last_val = results
        self.last_val_fit_step = fit_validation_step(self._trainer)
        self._val_store = {}
