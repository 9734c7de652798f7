"""In-backward optimizers (TorchRec's ``apply_optimizer_in_backward`` recipe) on the dense
replicas of sharded compressed modules: re-attached, stepped after a gradient all-reduce, and
shown to TorchRec as one fused optimizer.

DDP's own path for in-backward optimizers waits on an accelerator stream and fails on CPU, so
the sharded modules keep such replicas (projections, means, codebooks, feature processors) out
of DDP and do what DDP would: average the gradient over the process group, then step.
"""

import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torch.distributed.optim.apply_optimizer_in_backward import param_to_optim_hook_handle_map
from torchrec.optim.fused import FusedOptimizer


def optimizer_settings(param: Tensor) -> list[tuple[type[torch.optim.Optimizer], dict[str, Any]]]:
    """The in-backward optimizers attached to ``param``: ``(class, constructor kwargs)`` each.

    The settings are read from the optimizers themselves (``defaults``, fixed when they were
    built), not from ``param._optimizer_kwargs``: that is the dict the user passed to
    ``apply_optimizer_in_backward``, shared by every parameter of the call, and TorchRec's EBC
    sharder rewrites it in place when it shards a table of the same call (it adds
    ``"optimizer"`` and renames ``"lr"`` to ``"learning_rate"``), so an optimizer rebuilt from it
    fails, or silently runs at the default learning rate.  Only the keys the constructor takes
    are passed.

    Example::

        >>> p = nn.Parameter(torch.zeros(2))
        >>> kwargs = {"lr": 0.1}
        >>> _apply_optimizer_in_backward(torch.optim.SGD, [p], kwargs, register_hook=False)
        >>> kwargs["learning_rate"] = kwargs.pop("lr")  # what TorchRec's sharder does
        >>> [(cls.__name__, settings["lr"]) for cls, settings in optimizer_settings(p)]
        [('SGD', 0.1)]
    """
    out = []
    for optimizer in getattr(param, "_in_backward_optimizers", []):
        optimizer_class = type(optimizer)
        accepted = inspect.signature(optimizer_class.__init__).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        settings = {k: v for k, v in optimizer.defaults.items() if takes_any or k in accepted}
        out.append((optimizer_class, settings))
    return out


def copy_in_backward_optimizers(source: Tensor, target: nn.Parameter) -> None:
    """Attaches to ``target`` the in-backward optimizers attached to ``source`` (new instances).

    ``apply_optimizer_in_backward`` records the optimizer classes and settings on the parameter;
    a sharded module that builds new parameters must attach them again, or they are dropped.
    The step itself is hooked by :func:`step_in_backward`.
    """
    for optimizer_class, kwargs in optimizer_settings(source):
        _apply_optimizer_in_backward(optimizer_class, [target], kwargs, register_hook=False)


def step_in_backward(param: nn.Parameter, pg: dist.ProcessGroup | None) -> None:
    """Steps ``param``'s in-backward optimizers once its gradient is averaged over ``pg``.

    DDP's semantics for a replicated parameter, without DDP: its own in-backward path needs an
    accelerator (it waits on ``torch.accelerator.current_stream()``), so such parameters are
    left out of DDP (``sharded_parameter_names``).  The per-parameter hook PyTorch's
    ``_apply_optimizer_in_backward`` registered (a step on the local gradient) is removed.
    """
    for handle in param_to_optim_hook_handle_map.pop(param, []):
        handle.remove()

    def step(param: Tensor) -> None:
        assert param.grad is not None
        if pg is not None:
            dist.all_reduce(param.grad, group=pg)
            param.grad /= dist.get_world_size(pg)
        for optimizer in param._in_backward_optimizers:  # type: ignore[attr-defined]
            optimizer.step()
        param.grad = None

    param.register_post_accumulate_grad_hook(step)


def in_backward_group(pg: dist.ProcessGroup, needed: bool) -> dist.ProcessGroup | None:
    """A group of their own for in-backward all-reduces (they interleave with DDP's); collective."""
    if not needed or dist.get_world_size(pg) < 2:
        return None
    return dist.new_group(ranks=dist.get_process_group_ranks(pg))


class InBackwardFusedOptimizer(FusedOptimizer):
    """The in-backward optimizers of some parameters, seen as one TorchRec ``KeyedOptimizer``.

    The updates happen in backward (once the gradient is all-reduced), so ``step`` and
    ``zero_grad`` do nothing; ``state_dict`` / ``load_state_dict`` reach the live state of the
    underlying optimizers under the parameters' keys, as for TorchRec's fused optimizers.

    Args:
        params (Dict[str, nn.Parameter]): key -> parameter (e.g. ``codebooks.<table>``); those
            without an in-backward optimizer are left out.

    Example::

        >>> from torch.distributed.optim import _apply_optimizer_in_backward
        >>> books = nn.Parameter(torch.zeros(2, 4, 3))
        >>> _apply_optimizer_in_backward(torch.optim.SGD, [books], {"lr": 0.1})
        >>> list(InBackwardFusedOptimizer({"codebooks.t": books}).params)
        ['codebooks.t']
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        fused = {k: p for k, p in params.items() if hasattr(p, "_in_backward_optimizers")}
        optimizers = [o for p in fused.values() for o in p._in_backward_optimizers]
        super().__init__(
            fused,
            _OptimizerStates(optimizers),
            [group for o in optimizers for group in o.param_groups],
        )

    def step(self, closure: Any = None) -> None:
        """Nothing: the parameters were updated in backward."""

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Nothing: the in-backward step already cleared the gradients."""


class _OptimizerStates(Mapping[Tensor, Any]):
    """Live union of several optimizers' ``state`` (filled lazily at their first step)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self._optimizers = optimizers

    def __getitem__(self, param: Tensor) -> Any:
        for optimizer in self._optimizers:
            if param in optimizer.state:
                return optimizer.state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[Tensor]:
        return (p for o in self._optimizers for p in o.state)

    def __len__(self) -> int:
        return sum(len(o.state) for o in self._optimizers)
