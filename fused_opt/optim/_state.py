"""Optimizer state that tells the cached step plans when it changes.

A plan holds each bucket's state tensors in lists, so a step does not look up thousands of
dicts. User code replaces state tensors, though: ``state[p]["exp_avg"] = t.to(device)`` to
offload, ``optimizer.state[p] = {...}`` (Lightning moves state this way), ``optimizer.state =
defaultdict(dict)`` to reset. torch.optim reads the dicts at every step and follows; a plan
must too, or it goes on updating tensors that are no longer the optimizer's state.

So ``optimizer.state`` is an :class:`OptimizerState` (a ``defaultdict``) whose values are
:class:`ParamState` dicts, and every change to either moves a global generation counter on.
A plan remembers the generation it was built at and is rebuilt when that has moved.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["OptimizerState", "ParamState", "changed", "generation", "plain_state"]

_generation = 0
_MISSING = object()


def generation() -> int:
    """How many changes watched state dicts have seen, in this process."""
    return _generation


def changed() -> None:
    """Records a change: every plan built before it is rebuilt at its next step."""
    global _generation
    _generation += 1


class _Watched:
    """The mutating dict methods, each recording a change (``_stored`` may convert values)."""

    __slots__ = ()

    def _stored(self, value: Any) -> Any:
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        value = self._stored(value)
        if self.get(key, _MISSING) is not value:  # re-storing the same object changes nothing
            changed()
        super().__setitem__(key, value)  # type: ignore[misc]

    def __delitem__(self, key: Any) -> None:
        changed()
        super().__delitem__(key)  # type: ignore[misc]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> Any:
        self.update(other)
        return self

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:  # type: ignore[operator]
            self[key] = default
        return self[key]  # type: ignore[index]

    def pop(self, key: Any, *default: Any) -> Any:
        changed()
        return super().pop(key, *default)  # type: ignore[misc]

    def popitem(self) -> tuple[Any, Any]:
        changed()
        return super().popitem()  # type: ignore[misc]

    def clear(self) -> None:
        changed()
        super().clear()  # type: ignore[misc]


class ParamState(_Watched, dict):
    """One param's state (``step``, ``exp_avg``, ...), as torch.optim's plain dict."""

    __slots__ = ()


class OptimizerState(_Watched, defaultdict):
    """``optimizer.state``: param -> :class:`ParamState`, created empty on first access.

    A plain dict stored as a param's state is copied into a ParamState, so changes to the
    state are seen through whatever door they come in.
    """

    def __init__(self, state: Mapping[Any, Any] | Iterable[tuple[Any, Any]] = ()) -> None:
        super().__init__(ParamState)
        self.update(state)

    def _stored(self, value: Any) -> Any:
        return ParamState(value) if type(value) is dict else value

    def __missing__(self, key: Any) -> ParamState:
        # defaultdict's own, in Python: torch.compile traces it.
        value = self[key] = ParamState()
        return value

    # defaultdict copies and pickles itself through its factory argument, which ours does
    # not take.
    def __reduce__(self) -> tuple:
        return (OptimizerState, (), None, None, iter(self.items()))

    def copy(self) -> OptimizerState:
        return OptimizerState(self)

    __copy__ = copy


def plain_state(state: Mapping[Any, Any]) -> dict[Any, Any]:
    """The ``state`` of a state_dict, with plain dicts as torch.optim's: checkpoints load
    without fused_opt, also with ``torch.load(weights_only=True)``."""
    return {k: dict(v) if isinstance(v, ParamState) else v for k, v in state.items()}
