"""Forward hooks and in-place weight edits as context managers that always undo themselves.

Every manager removes its hooks (or restores its weights) in a `finally`, so an exception inside the
`with` block cannot leave a model silently modified (docs/design.md §8: "hooks left attached after an exception").
Modules are called with keyword arguments in transformers 5 (e.g. `self_attn(hidden_states=...)`), so the
"first input" of a call is its first positional argument, else its first tensor keyword argument.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from .distributed import local


@contextmanager
def single_thread():
    """Run memory-bound tensor work (mask selection, set algebra, packing) on one thread. On this project's
    shared 2-core machine, two OpenMP threads competing with other processes made such work ~5x slower than one
    thread (measured: per-matrix top-2% of a 0.5B model, 24 s vs 4.8 s); a second thread gains little when idle."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def one_thread(fn):
    """Decorator form of `single_thread`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with single_thread():
            return fn(*args, **kwargs)
    return wrapper


def _first_input(args: tuple, kwargs: dict) -> tuple[str | int, torch.Tensor]:
    if args:
        return 0, args[0]
    for key, value in kwargs.items():
        if torch.is_tensor(value):
            return key, value
    raise ValueError("module call has no tensor input")


def _main_output(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def registered(handles_factory):
    """Yield `handles_factory(handles)`, which registers hooks and appends their handles to `handles`; every one of
    them is removed on exit, also after an exception."""
    handles = []
    try:
        yield handles_factory(handles)
    finally:
        for h in handles:
            h.remove()


def capture_inputs(modules: dict, reduce=None):
    """Yield {name: [first input of each call]}; `reduce(name, x)` stores a summary instead of x."""
    def install(handles):
        store = {name: [] for name in modules}
        for name, module in modules.items():
            def hook(mod, args, kwargs, name=name):
                x = _first_input(args, kwargs)[1]
                store[name].append(reduce(name, x) if reduce else x.detach())
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return store
    return registered(install)


def capture_outputs(modules: dict, reduce=None):
    """Yield {name: [main output of each call]} (the first element when a module returns a tuple)."""
    def install(handles):
        store = {name: [] for name in modules}
        for name, module in modules.items():
            def hook(mod, args, output, name=name):
                y = _main_output(output)
                store[name].append(reduce(name, y) if reduce else y.detach())
            handles.append(module.register_forward_hook(hook))
        return store
    return registered(install)


def capture_calls(modules: dict):
    """Yield {name: [(args, kwargs) of each call]}, so a module can be re-run alone on the same inputs."""
    def install(handles):
        store = {name: [] for name in modules}
        for name, module in modules.items():
            def hook(mod, args, kwargs, name=name):
                store[name].append((args, dict(kwargs)))
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return store
    return registered(install)


def edit_input(module: nn.Module, fn):
    """Replace the module's first input x by fn(x) on every call."""
    def install(handles):
        def hook(mod, args, kwargs):
            key, x = _first_input(args, kwargs)
            if key == 0:
                return (fn(x), *args[1:]), kwargs
            return args, {**kwargs, key: fn(x)}
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return registered(install)


def edit_output(module: nn.Module, fn):
    """Replace the module's main output y by fn(y) on every call."""
    def install(handles):
        def hook(mod, args, output):
            if isinstance(output, tuple):
                return (fn(output[0]), *output[1:])
            return fn(output)
        handles.append(module.register_forward_hook(hook))
    return registered(install)


def _scale_last_dims(x: torch.Tensor, dims, factor: float) -> torch.Tensor:
    idx = torch.as_tensor(list(dims), dtype=torch.long, device=x.device)
    if factor == 0:
        return x.index_fill(-1, idx, 0)
    y = x.clone()
    y[..., idx] = y[..., idx] * factor
    return y


def scale_output_dims(module: nn.Module, dims, factor: float):
    """Multiply output features `dims` by `factor` (0 zeroes them: deactivates q/k/v output neurons)."""
    return edit_output(module, lambda y: _scale_last_dims(y, dims, factor))


def zero_input_dims(module: nn.Module, dims):
    """Zero input features `dims` (deactivates FFN units at down_proj, per-head dims at o_proj)."""
    return edit_input(module, lambda x: _scale_last_dims(x, dims, 0.0))


@contextmanager
def scaled_weights(model: nn.Module, names, alpha: float):
    """Multiply the named parameters by alpha in place; restore them bit-exactly from a copy on exit."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"unknown parameter names: {missing[:5]}")
    saved = {n: params[n].detach().clone() for n in names}
    try:
        with torch.no_grad():
            for n in saved:
                params[n].mul_(alpha)
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


@contextmanager
def zeroed_weights(model: nn.Module, masks: dict):
    """Set the masked entries of the named parameters to zero in place; restore them bit-exactly on exit.
    Touched tensors are copied whole: masked_fill needs no index compaction, which is slow on CPU."""
    params = dict(model.named_parameters())
    missing = [n for n in masks if n not in params]
    if missing:
        raise KeyError(f"unknown parameter names: {missing[:5]}")
    saved = {}
    try:
        with torch.no_grad(), single_thread():
            for n, m in masks.items():
                if m.any():
                    w = local(params[n])   # a sharded param takes the mask of its local shard
                    saved[n] = w.detach().clone()
                    w.masked_fill_(m.to(w.device), 0)
        yield
    finally:
        with torch.no_grad(), single_thread():
            for n, w in saved.items():
                local(params[n]).copy_(w)


@contextmanager
def grad_only_for(model, params: Iterable[nn.Parameter]):
    """Inside: exactly `params` require grad, their `.grad` starts empty, the model is in eval mode and grad
    mode is on. On exit (also after an exception): flags, pre-existing `.grad`s and train/eval are
    restored."""
    params = list(params)
    wanted = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    stashed = [(p, p.grad) for p in params]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
        for p in params:
            p.grad = None
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for p, g in stashed:
            p.grad = g
        model.train(was_training)
