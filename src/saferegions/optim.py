"""Masked AdamW for SET / SPA (docs/methods.md §4.6) and the parameter selection that goes with it.

The authors' optimizer (SafeWeights-ACL `optimizers.py`) keeps dense AdamW moments fed by the full gradient
and multiplies the final update by the mask. Moments are element-wise, so the trajectory of a trainable entry
never depends on another entry: keeping state only for the trainable entries ("sparse" mode) gives the same
trajectory with memory proportional to the mask.
"""
from __future__ import annotations

import math

import torch

from .distributed import every_rank, is_sharded, local

MODES = ("faithful", "sparse")
_BIAS_NORM_KEYS = ("bias", "norm", "ln_")  # reference `trainer.py`: substring match on the lower-cased name


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW whose update touches only mask-True entries; mask-False entries stay bit-identical.

    `params_with_masks`: list of (param, mask or None); mask is a bool tensor of the param's shape
    (True = trainable), None = fully trainable.

    Update (reference code, per element): m, v from the full gradient, then
        θ ← θ − (lr / (1 − β₁ᵗ)) · M ⊙ (m / (√v / √(1 − β₂ᵗ) + ε) + λθ)
    Note the reference multiplies the weight decay by the bias-corrected step size lr/(1 − β₁ᵗ), not by lr
    (10× at step 1, → 1 after a few dozen steps). docs/methods.md §4.6 writes the decay with plain η, which is
    torch.optim.AdamW's decoupled decay. `ref_decay=True` (default) follows the code; `ref_decay=False` gives
    the formula / torch.optim.AdamW.

    Modes (they change memory, never the trajectory):
    - "faithful": dense fp32 m, v for every fp32 param (the reference's memory profile).
    - "sparse": per param with a mask, a flat index of the trainable entries and m, v of that size; the
      gradient is gathered at the index and the new values written back with index_put_. Where the index
      would cost more than dense state (density > 8 / (8 + index bytes), e.g. SPA's 99% masks) the param
      falls back to dense moments plus the mask — same trajectory, less memory.
    Low-precision params (bf16, fp16) always get the sparse layout, whatever the mode, plus an fp32 master
    copy of their trainable entries (`state["master"]`, beside m and v): the update is applied to the master
    and the param holds its rounding. Without it an update below half a bf16 ulp of the weight (most updates at
    lr 3e-5) is rounded away at every step and the entry never moves. fp32 params need no master.
    Deviation from the reference: moments are fp32 (the reference keeps them in the param dtype, i.e. bf16
    under --bf16) and bf16 weights train through fp32 masters.

    FSDP2-sharded params (DTensors, `distributed.shard`): masks are the local shards' masks, and every step,
    index and state tensor acts on the local shard (`distributed.local`), so state is proportional to the
    local mask. The update is element-wise, so a sharded run is the one-process run split by rows.

    Dense fp32 params go through torch's fused AdamW kernel (one pass instead of ~12: 0.6 s instead of 4.6 s
    per step for 630M entries on 2 cores), with the reference's decay as weight_decay / (1 − β₁ᵗ) under
    ref_decay, and their frozen entries (kept as a flat index) saved before the step and written back after it.
    """

    def __init__(self, params_with_masks, lr: float = 3e-5, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, mode: str = "faithful", ref_decay: bool = True,
                 index_dtype: torch.dtype = torch.int64):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if index_dtype not in (torch.int64, torch.int32):
            raise ValueError("index_dtype must be torch.int64 or torch.int32")
        pairs = list(params_with_masks)
        params = [p for p, _ in pairs]
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.mode, self.ref_decay = mode, ref_decay
        self._masks: dict[torch.Tensor, torch.Tensor] = {}  # dense-layout masks (kept out of `state`)
        self._frozen: dict[torch.Tensor, torch.Tensor] = {}  # their complements as flat indices (fused step)
        self.trainable = sum(local(p).numel() for p, mask in pairs if mask is None)   # entries (of this rank's
        # shards) the optimizer may change
        idx_bytes = torch.empty((), dtype=index_dtype).element_size()
        for param, mask in pairs:
            if mask is None:
                continue
            p = local(param)
            if mask.dtype != torch.bool or mask.shape != p.shape:
                raise ValueError(f"mask must be bool with the (local) param's shape {tuple(p.shape)}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            mask = mask.to(p.device)
            k = int(mask.sum())
            self.trainable += k
            if k == p.numel():
                continue  # all-True: plain AdamW
            state_bytes_per_entry = 8 if p.dtype == torch.float32 else 12   # m, v (+ fp32 master)
            sparse = mode == "sparse" or p.dtype != torch.float32
            if sparse and k * (state_bytes_per_entry + idx_bytes) < state_bytes_per_entry * p.numel():
                if not p.is_contiguous():
                    raise ValueError("sparse mode needs contiguous params (flat view)")
                if index_dtype == torch.int32 and p.numel() >= 2**31:
                    raise ValueError("int32 index cannot address a param with >= 2**31 entries")
                self.state[param]["idx"] = mask.reshape(-1).nonzero().squeeze(1).to(index_dtype)
            else:
                self._masks[param] = mask

    def index(self, p: torch.Tensor) -> torch.Tensor | None:
        """Flat index of `p`'s trainable entries where its state is kept per entry, else None (dense state)."""
        return self.state[p].get("idx") if p in self.state else None

    def load_state_dict(self, state_dict):
        """torch casts every state tensor to the param dtype on load (bf16 moments, float indices): undo it."""
        keep = {i: {k: v for k, v in s.items() if torch.is_tensor(v)} for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]  # torch's state_dict numbering
        for i, saved in keep.items():
            for k, v in saved.items():
                self.state[params[i]][k] = v.to(device=params[i].device, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("MaskedAdamW does not support sparse gradients")
                state = self.state[param]
                p, grad = local(param), local(param.grad)
                idx = state.get("idx")
                if idx is not None and idx.numel() == 0:
                    continue  # nothing trainable: no state, no update
                if "step" not in state:
                    shape = idx.shape if idx is not None else p.shape
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                    if p.dtype != torch.float32:
                        theta = p.detach().reshape(-1).index_select(0, idx) if idx is not None else p.detach()
                        state["master"] = theta.float()
                state["step"] += 1
                t = state["step"]
                if idx is None and p.dtype == torch.float32:
                    self._fused_step(param, state, t, lr, b1, b2, eps, wd)
                    continue
                master = state.get("master")
                if idx is not None:
                    flat = p.view(-1)
                    g = grad.reshape(-1).index_select(0, idx).float()
                    theta = master if master is not None else flat.index_select(0, idx).float()
                else:
                    g, theta = grad.float(), master if master is not None else p.float()
                new = self._adam(theta, g, state["exp_avg"], state["exp_avg_sq"], t, lr, b1, b2, eps, wd)
                if master is not None:
                    if param in self._masks:
                        new = torch.where(self._masks[param], new, master, out=new)
                    master.copy_(new)
                new = new.to(p.dtype)
                if idx is not None:
                    flat.index_put_((idx,), new)  # index_copy_ would reject int32 indices
                elif param in self._masks:
                    p.copy_(torch.where(self._masks[param], new, p, out=new))
                else:
                    p.copy_(new)
        return loss

    def _fused_step(self, param, state, t, lr, b1, b2, eps, wd):
        """The same update by torch's fused kernel; frozen entries are restored from a copy taken before."""
        p, grad, mask = local(param), local(param.grad), self._masks.get(param)
        if mask is not None:
            if param not in self._frozen:   # flat index of the frozen entries (1% of SPA's params), built once
                self._frozen[param] = (~mask).reshape(-1).nonzero().squeeze(1)
            kept = p.view(-1).index_select(0, self._frozen[param])
        decay = wd / (1 - b1**t) if self.ref_decay else wd
        torch._fused_adamw_([p], [grad.float()], [state["exp_avg"]], [state["exp_avg_sq"]], [],
                            [torch.tensor(float(t))], lr=lr, beta1=b1, beta2=b2, weight_decay=decay, eps=eps,
                            amsgrad=False, maximize=False)
        if mask is not None:
            p.view(-1).index_copy_(0, self._frozen[param], kept)

    def _adam(self, theta, g, m, v, t, lr, b1, b2, eps, wd):
        """One element-wise AdamW step on fp32 tensors; updates m, v in place, returns the new θ."""
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        upd = v.sqrt().div_(math.sqrt(bc2)).add_(eps)  # in place throughout: one param-sized temporary
        upd = torch.div(m, upd, out=upd)
        step_size = lr / bc1
        if self.ref_decay:  # reference: decay inside the bias-corrected step
            if wd:
                upd.add_(theta, alpha=wd)
            return upd.mul_(-step_size).add_(theta)
        return upd.mul_(-step_size).add_(theta, alpha=1 - lr * wd)  # torch.optim.AdamW: θ(1 − ηλ) − step


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in the optimizer state (moments, indices; the python step counter is free)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))


def is_bias_or_norm(name: str) -> bool:
    """Reference rule for `--force_train_bias_norm`: 'bias', 'norm' or 'ln_' in the lower-cased name."""
    return any(k in name.lower() for k in _BIAS_NORM_KEYS)


def invert_masks(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SPA masks: freeze the region, train the rest of each masked tensor."""
    return {k: ~m.bool() for k, m in masks.items()}


def build_param_groups(model: torch.nn.Module, masks: dict[str, torch.Tensor] | None,
                       force_bias_norm: bool = True, train_outside_mask: bool = False,
                       freeze_empty: bool = True) -> list[tuple[torch.nn.Parameter, torch.Tensor | None]]:
    """(param, mask) pairs for MaskedAdamW, as the reference's `generate_masks`.

    - masks None: everything trainable (full SFT).
    - SET: `masks` = region, train_outside_mask=False → params absent from `masks` are frozen.
    - SPA: `invert_masks(region)`, train_outside_mask=True → params absent are fully trainable
      (embeddings and lm_head included).
    - force_bias_norm: bias / norm params are fully trainable whatever the mask (reference default, which its
      CLI cannot turn off).
    Sharded params take local masks, and whether one is all-True or empty is decided over all ranks (each rank
    must compute the same gradients). Params already frozen (requires_grad False) are skipped, as in the
    reference. Params with nothing to train
    get requires_grad=False (no gradient, no state) when freeze_empty; set it False to keep their gradients,
    e.g. for a global grad-norm clip over all weights as in the reference's Trainer run.
    """
    named = dict(model.named_parameters())
    if masks is not None:
        unknown = sorted(set(masks) - set(named))
        if unknown:
            raise KeyError(f"masks name {len(unknown)} tensors absent from the model, e.g. {unknown[:3]}")
    pairs = []
    for name, p in named.items():
        if not p.requires_grad:
            continue
        if masks is None or (force_bias_norm and is_bias_or_norm(name)):
            mask = None
        elif name in masks:
            mask = masks[name].to(dtype=torch.bool)   # stays where it is: MaskedAdamW moves one at a time
            if mask.shape != local(p).shape:
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, param {tuple(local(p).shape)}")
            if every_rank(bool(mask.all()), is_sharded(p)):
                mask = None
        else:
            mask = None if train_outside_mask else torch.zeros(local(p).shape, dtype=torch.bool)
        if mask is not None and freeze_empty and every_rank(not bool(mask.any()), is_sharded(p)):
            p.requires_grad_(False)
            continue
        pairs.append((p, mask))
    return pairs
