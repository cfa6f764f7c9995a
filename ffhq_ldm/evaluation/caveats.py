"""The caveat that goes with every printed FID/KID: how many images they were measured on.

FID's estimate is biased upward, and the bias grows as the number of images N shrinks (Chong
and Forsyth 2020, "Effectively Unbiased FID and Inception Score and where to find them", Sec. 3),
so FIDs at different N are not comparable, and one over a few hundred samples says little about
a model: published FFHQ figures use 50,000 samples. KID's estimate is unbiased (Bińkowski et
al. 2018, "Demystifying MMD GANs", Sec. 3), but its spread over subsets widens as N shrinks.
"""

from __future__ import annotations

STANDARD_NUM_SAMPLES = 50_000


def small_sample_caveat(num_samples: int, num_reference: int | None = None) -> str | None:
    """One line for FID/KID measured on fewer than 50,000 samples; None at or above it."""
    if num_samples >= STANDARD_NUM_SAMPLES:
        return None
    ref = f" against {num_reference} reference images" if num_reference is not None else ""
    return (f"note: FID/KID over {num_samples} samples{ref}: FID is biased upward at small N "
            f"(published figures use {STANDARD_NUM_SAMPLES}), so compare FIDs only at equal N; "
            "KID is unbiased but its std (kid_std) widens as N shrinks")
