"""Explaining a model without touching it.

The explanation runs under evaluation semantics (batch norm on its running statistics, dropout and
stochastic depth off, no autograd unless a differentiable map is asked for), as pytorch-grad-cam
and torchcam do, and every module's own mode is restored afterwards. In evaluation mode nothing
writes to parameters or buffers, so they come back bit-identical, and a model in training mode
gets the maps of its evaluation mode.

Modes are state shared by every thread that uses a module, so explanations that share a module
run one at a time: each module has a re-entrant lock, held for the whole block. Without it, two
interleaved blocks would each restore the modes the other had set, and one would run in the
other's modes.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from contextvars import ContextVar
from typing import ContextManager, Iterator, Optional

import torch
from torch import nn

_locks: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()
_explained: ContextVar[Optional[nn.Module]] = ContextVar("shapcam_explained", default=None)


def _module_locks(model: nn.Module) -> list:
    """The locks of ``model``'s modules, in one global order (by id), so that two threads locking
    overlapping models (a model and a wrapper around it) cannot each hold a lock the other needs."""
    with _locks_guard:
        return [_locks.setdefault(module, threading.RLock()) for module in sorted(model.modules(), key=id)]


@contextmanager
def eval_semantics(model: nn.Module, grad: bool = False) -> Iterator[nn.Module]:
    """Puts every module of ``model`` in eval mode and disables autograd for the block (enables it
    with ``grad``: a differentiable map records its graph), then restores each module's own
    ``training`` flag (mixed modes included), even on an error.

    Blocks on the same modules in other threads wait for this one to end; the same thread may
    nest blocks."""
    with ExitStack() as held:
        for lock in _module_locks(model):
            held.enter_context(lock)
        modes = [(module, module.training) for module in model.modules()]
        try:
            if any(training for _, training in modes):  # a model already in eval mode costs nothing here
                model.eval()
            token = _explained.set(model)
            try:
                with torch.set_grad_enabled(grad):
                    yield model
            finally:
                _explained.reset(token)
        finally:
            for module, training in modes:
                if module.training != training:
                    module.training = training


def current_semantics() -> ContextManager:
    """A context manager that re-enters, each time it is entered, the evaluation semantics of the
    block active now, with autograd on: for work that a differentiable map's backward recomputes
    (once, or again for a second derivative) after the block has given the model its own modes
    back, when a model in training mode would recompute in training mode. Outside a block, it does
    nothing."""
    return _Reentered(_explained.get())


class _Reentered:
    def __init__(self, model: Optional[nn.Module]):
        self.model, self.entered = model, []

    def __enter__(self) -> None:
        block = nullcontext() if self.model is None else eval_semantics(self.model, grad=True)
        self.entered.append(block)
        block.__enter__()

    def __exit__(self, *exc) -> Optional[bool]:
        return self.entered.pop().__exit__(*exc)
