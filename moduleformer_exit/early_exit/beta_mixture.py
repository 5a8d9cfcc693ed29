"""FREE's adaptive exit threshold: a two-component Beta mixture fitted on (confidence, agree) calibration pairs,
and the grid lookup of the smallest confidence whose "agree" posterior passes ``zeta``.

``repo_compat=True`` reproduces ``BetaMixture1D`` of the FREE repository (util/bmm.py): hard-label responsibilities
(0.9995 / 0.0005 after its flooring and normalisation), a weighted method-of-moments M-step, equal priors in the
posterior, a 10-point grid on [0.3, 0.9]. ``repo_compat=False`` uses exact hard labels and guards degenerate fits
(an empty class keeps its prior; zero variance is floored).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

EPS = 1e-4


def _beta_pdf(x: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Beta density at ``x`` (float64)."""
    log_norm = torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)
    return torch.exp((alpha - 1) * torch.log(x) + (beta - 1) * torch.log1p(-x) - log_norm)


class BetaMixtureThreshold:
    """Online threshold estimator: :meth:`add` calibration pairs, :meth:`fit`, read :meth:`threshold`.

    Component 0 = "disagree" (prior Beta(1, 2)), component 1 = "agree" (prior Beta(2, 1)). ``max_fits`` caps the
    number of refits (FREE: 300), ``window`` bounds the calibration buffer (None: keep all, as the repository)."""

    def __init__(self, zeta: float = 0.4, grid_low: float = 0.3, grid_high: float = 0.9, grid_size: int = 10,
                 max_fits: int = 300, window: Optional[int] = None, repo_compat: bool = True,
                 initial_threshold: float = 0.9) -> None:
        if not 0.0 <= grid_low < grid_high <= 1.0 or grid_size < 2:
            raise ValueError("the threshold grid needs 0 <= grid_low < grid_high <= 1 and grid_size >= 2.")
        self.zeta, self.grid_size, self.max_fits, self.window = zeta, grid_size, max_fits, window
        self.grid = torch.linspace(grid_low, grid_high, grid_size, dtype=torch.float64)
        self.repo_compat = repo_compat
        self.alphas = torch.tensor([1.0, 2.0], dtype=torch.float64)
        self.betas = torch.tensor([2.0, 1.0], dtype=torch.float64)
        self.confidences: list[float] = []
        self.labels: list[bool] = []
        self.fits = 0
        self.current = float(initial_threshold)

    def add(self, confidence: Tensor, agree: Tensor) -> None:
        """Add calibration pairs: ``confidence`` ``[N]`` in [0, 1], ``agree`` ``[N]`` bool (shallow == deep)."""
        self.confidences += [float(c) for c in confidence.reshape(-1)]
        self.labels += [bool(a) for a in agree.reshape(-1)]
        if self.window is not None and len(self.labels) > self.window:
            self.confidences, self.labels = self.confidences[-self.window:], self.labels[-self.window:]

    def fit(self, confidence: Optional[Tensor] = None, agree: Optional[Tensor] = None) -> None:
        """Fit both components on ``(confidence [N], agree [N])`` (default: the buffer); counts one refit."""
        x = torch.as_tensor(self.confidences if confidence is None else confidence, dtype=torch.float64).reshape(-1)
        y = torch.as_tensor(self.labels if agree is None else agree).reshape(-1).long()
        if x.numel() == 0:
            raise ValueError("BetaMixtureThreshold.fit needs at least one calibration pair.")
        x = x.clamp(EPS, 1 - EPS)
        onehot = torch.nn.functional.one_hot(y, 2).double()
        if self.repo_compat:  # the repository's (1 - lam_r) * onehot, floored at eps, normalised per sample
            resp = (0.2 * onehot).clamp_min(EPS)
            resp = resp / resp.sum(1, keepdim=True)
        else:
            resp = onehot
        for c in range(2):
            weights = resp[:, c]
            total = weights.sum()
            if not self.repo_compat and total <= 0:
                continue  # an empty class keeps its current parameters
            mean = (weights * x).sum() / total
            var = (weights * (x - mean) ** 2).sum() / total
            if not self.repo_compat:
                var = var.clamp_min(1e-12)
            alpha = mean * (mean * (1 - mean) / var - 1)
            self.alphas[c], self.betas[c] = alpha, alpha * (1 - mean) / mean
        self.fits += 1
        self.current = self.lookup()

    def lookup(self) -> float:
        """The grid threshold: ``grid[clip(grid_size - #{grid points with P(agree | x) > zeta}, 0, size - 1)]``."""
        means = self.alphas / (self.alphas + self.betas)
        agree = int(torch.argmax(torch.nan_to_num(means, nan=-1.0)))
        with torch.no_grad():
            dens = torch.stack([_beta_pdf(self.grid, self.alphas[c], self.betas[c]) for c in range(2)])
            post = dens[agree] / (dens[agree] + dens[1 - agree])
        count = int((post > self.zeta).sum())  # NaN (degenerate fit) compares False
        return float(self.grid[min(max(0, self.grid_size - count), self.grid_size - 1)])

    def maybe_refit(self) -> float:
        """FREE's schedule (called once per new sample): refit on the buffer if it has data and fewer than
        ``max_fits`` refits were done; returns the threshold to use."""
        if self.labels and self.fits < self.max_fits:
            self.fit()
        return self.current

    def threshold(self) -> float:
        """The current threshold (the initial one before any fit)."""
        return self.current
