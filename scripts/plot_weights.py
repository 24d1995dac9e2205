"""Plot the TR-GRPO token weight against the token probability for the default parameters.

    python scripts/plot_weights.py                    # writes docs/tr_grpo_weight.png
    python scripts/plot_weights.py --out weights.png  # elsewhere

Also draws the literal transcription tau = 9 (a constant weight of 1) and Advantage Reweighting
(alpha = 0.3) for comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from trgrpo.weighting import TokenRegulatedWeighting  # noqa: E402


def main(out: str = "docs/tr_grpo_weight.png") -> None:
    p = torch.linspace(0, 1, 501)
    default = TokenRegulatedWeighting()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(
        p,
        default.weight_of_prob(p),
        lw=2,
        label=f"TR-GRPO default: alpha={default.alpha}, tau=1/9, mu={default.mu}, clip [1, 1.4]",
    )
    ax.plot(p, TokenRegulatedWeighting(tau=9.0).weight_of_prob(p), "--", label="literal tau = 9 (constant 1)")
    ax.plot(p, 0.3 * p + 0.7, ":", label="Advantage Reweighting, alpha = 0.3")
    ax.set_xlabel("token probability p")
    ax.set_ylabel("token weight w")
    ax.set_ylim(0.6, 1.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options through argparse, so ``--help`` prints help instead of becoming an output file name."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default="docs/tr_grpo_weight.png", help="PNG to write (default: %(default)s)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args().out)
