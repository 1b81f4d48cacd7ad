"""Optimisers: Ranger (RAdam + Lookahead), which the study found to converge best, and Adam and SGD.

Lookahead (Zhang et al. 2019) keeps a copy of "slow" weights. The inner optimiser moves the "fast"
weights (the model's parameters); every k steps the slow weights move a fraction α toward them,
slow ← slow + α·(fast − slow), and the fast weights restart from there. Ranger (Wright 2019) is
Lookahead around RAdam; its defaults are k = 6, α = 0.5, betas (0.95, 0.999), eps 1e-5.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from ctvlab.config import OptimConfig
from ctvlab.errors import ConfigError


class Lookahead(Optimizer):
    """Lookahead around any torch optimiser.

    Shares `param_groups` and `state` with the inner optimiser, so learning-rate schedulers and
    gradient clipping see the real groups. The slow weights start as the parameters' values at
    construction. `state_dict()` holds the inner state, the slow weights and the step counter, so a
    checkpoint resumes exactly.

    Args:
        optimizer: the inner ("fast") optimiser, e.g. `torch.optim.RAdam`.
        k: inner steps between slow-weight updates.
        alpha: slow-weight step size toward the fast weights, in [0, 1].
    """

    def __init__(self, optimizer: Optimizer, k: int = 6, alpha: float = 0.5):
        # Optimizer.__init__ is not called on purpose: it would build param groups of its own,
        # and the inner optimiser's must be the only ones. These are the attributes it sets.
        if k < 1:
            raise ValueError(f"Lookahead k must be ≥ 1, got {k}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Lookahead alpha must be in [0, 1], got {alpha}")
        self.optimizer = optimizer
        self.k = int(k)
        self.alpha = float(alpha)
        self.lookahead_steps = 0
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._slow: dict[torch.Tensor, torch.Tensor] = {}
        self._init_slow(self.param_groups)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def _init_slow(self, groups: Iterable[dict[str, Any]]) -> None:
        for group in groups:
            for p in group["params"]:
                if p not in self._slow:
                    self._slow[p] = p.detach().clone()

    def slow_weights(self) -> list[torch.Tensor]:
        """The slow weights, in parameter order (views: do not modify)."""
        return [self._slow[p] for p in self._params()]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._init_slow(self.param_groups[-1:])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def _sync(self) -> None:
        for p in self._params():
            slow = self._slow[p]
            if slow.device != p.device or slow.dtype != p.dtype:
                # The model moved (e.g. to the GPU by Ray Train's prepare_model) after the optimiser
                # was built: the slow weights follow their parameter.
                slow = self._slow[p] = slow.to(device=p.device, dtype=p.dtype)
            slow.add_(p.detach() - slow, alpha=self.alpha)
            p.copy_(slow)

    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """One inner step; every k-th also moves the slow weights and resets the fast ones to them."""
        loss = self.optimizer.step(closure)
        self.lookahead_steps += 1
        if self.lookahead_steps % self.k == 0:
            self._sync()
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """{"base": inner state dict, "lookahead": {k, alpha, steps, slow: [tensors in parameter order]}};
        loadable with `torch.load(weights_only=True)`."""
        return {
            "base": self.optimizer.state_dict(),
            "lookahead": {
                "k": self.k,
                "alpha": self.alpha,
                "steps": self.lookahead_steps,
                "slow": [s.clone() for s in self.slow_weights()],
            },
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if set(state_dict) != {"base", "lookahead"}:
            raise ValueError(
                f"not a Lookahead state dict (keys {sorted(state_dict)}); was it saved from another optimiser?"
            )
        la = state_dict["lookahead"]
        params = self._params()
        if len(la["slow"]) != len(params):
            raise ValueError(
                f"state dict has {len(la['slow'])} slow weights, the optimiser {len(params)} params"
            )
        self.optimizer.load_state_dict(state_dict["base"])
        self.k, self.alpha, self.lookahead_steps = int(la["k"]), float(la["alpha"]), int(la["steps"])
        for p, saved in zip(params, la["slow"], strict=True):
            self._slow[p].copy_(saved)

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, {self.optimizer!r})"


def build_optimizer(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], cfg: OptimConfig) -> Optimizer:
    """The configured optimiser: "ranger" = Lookahead(RAdam), "adam" or "sgd".

    Raises:
        ConfigError: unknown optimiser name.
    """
    if cfg.name == "ranger":
        inner = torch.optim.RAdam(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        return Lookahead(inner, k=cfg.lookahead_k, alpha=cfg.lookahead_alpha)
    if cfg.name == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimiser {cfg.name!r}; choose ranger, adam or sgd.")
