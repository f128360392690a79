"""Power-function EMA profiles and the post-hoc reconstruction of any EMA length from their snapshots.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2, arXiv:2312.02696),
section 3. A power-function EMA at step t averages the weights of steps tau <= t with density proportional to
tau^gamma, which is the update theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t with
beta_t = (1 - 1/t)^(gamma + 1). Its length is sigma_rel, the standard deviation of that density relative to t
(eq. 3). Training tracks two such profiles and saves snapshots of both; afterwards any profile (t_r, gamma_r) is
the least-squares combination of the snapshots' profiles (section 3.2): the weights x solve A x = b with
A_ij = <p_i, p_j> and b_i = <p_i, p_r>, inner products of the densities over tau. Written here from the
paper's equations (NVlabs/edm2's code is CC BY-NC-SA and was not used).
"""

import math
from collections.abc import Sequence

import numpy as np


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """gamma of the profile whose relative standard deviation is `sigma_rel` (EDM2 eq. 3 solved for gamma: the
    largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2))."""
    if not 0 < sigma_rel < 12**-0.5:  # gamma = 0, a uniform average of the whole run, is 1/sqrt(12)
        raise ValueError(f"sigma_rel must be in (0, {12**-0.5:.4f}), got {sigma_rel}")
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(root.real for root in roots if abs(root.imag) < 1e-9))


def power_ema_beta(step: int, gamma: float) -> float:
    """The update's beta at optimizer step `step` (1-based): 0 at the first step (a copy)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_products(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b> for densities p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on (0, t], broadcast over arrays:
    (gamma_a + 1)(gamma_b + 1) min(t_a, t_b)^(gamma_a + gamma_b + 1) / ((gamma_a + gamma_b + 1) t_a^(gamma_a + 1)
    t_b^(gamma_b + 1)), computed through ratios so that large step counts do not overflow."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    low = np.minimum(t_a, t_b)
    scale = (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
    return scale * (low / t_a) ** (gamma_a + 1) * (low / t_b) ** (gamma_b + 1) / low


def solve_weights(
    steps: Sequence[int], gammas: Sequence[float], target_step: int, target_gamma: float
) -> tuple[np.ndarray, float]:
    """(weights of the snapshots, relative L2 error of the reconstructed density) for the profile
    (target_step, target_gamma)."""
    t, g = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    gram = profile_products(t[:, None], g[:, None], t[None, :], g[None, :])
    rhs = profile_products(t, g, float(target_step), target_gamma)
    weights = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    target_norm = float(profile_products(target_step, target_gamma, target_step, target_gamma))
    residual = target_norm - 2 * weights @ rhs + weights @ gram @ weights
    return weights, math.sqrt(max(residual, 0.0) / target_norm)
