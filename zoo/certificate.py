"""The certificate of a posterior: a rigorous bound on its Gibbs 0-1 risk, with what it is (docs/method.md §5)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zoo.errors import ConfigError
from zoo.pacbayes import GibbsCertificate

DEFAULT_SAMPLE_SHARE = 0.2
"""Share of δ spent on the Monte Carlo step (δ' = 0.2·δ); the kl-bound gets the rest, so the total is δ."""


@dataclass(frozen=True)
class Certificate:
    """A rigorous bound on the Gibbs 0-1 risk of a posterior, with what it is and what went into it.

    `bound` holds with probability ≥ 1 − `delta` (over the training sample and the weight draws together):
    δ is split into `gibbs.delta` for the kl-bound and `gibbs.delta_sample` for the Monte Carlo estimate.
    `taylor_bound` is the paper's number beside it (Catoni on the Taylor-approximated NLL risk in bits, c on a
    grid with the union bound paid); it is approximate, not a certificate, and None when not recorded.
    """

    bound: float
    kind: str
    delta: float
    empirical_risk: float
    kl: float
    n: int
    samples: int
    taylor_bound: float | None
    taylor_kind: str | None
    hypotheses: int
    gibbs: GibbsCertificate

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields (the Gibbs record nested)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "gibbs"}
        out["gibbs"] = self.gibbs.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Certificate:
        """Inverse of to_dict (as stored in prior_config.json under "certificate")."""
        try:
            gibbs_fields = {f.name for f in dataclasses.fields(GibbsCertificate)}
            gibbs = GibbsCertificate(**{k: v for k, v in data["gibbs"].items() if k in gibbs_fields})
            own = {f.name for f in dataclasses.fields(cls)} - {"gibbs"}
            return cls(**{k: data[k] for k in own}, gibbs=gibbs)
        except (KeyError, TypeError) as err:
            raise ConfigError(f"the stored certificate is incomplete ({err}); recompute it with "
                              "posterior.certificate(train_loader)") from err

    def __str__(self) -> str:
        lines = [
            f"certificate: {self.bound:.4f}  (upper bound on the Gibbs 0-1 test error, "
            f"holds w.p. ≥ {1 - self.delta:g})",
            f"  what: {self.kind}",
            f"  empirical Gibbs 0-1 risk {self.empirical_risk:.4f} from {self.samples} weight draws "
            f"(upper {self.gibbs.empirical_risk_upper:.4f} at δ'={self.gibbs.delta_sample:g}), "
            f"KL(Q‖P) = {self.kl:.2f} nats, n = {self.n}, union bound over {self.hypotheses} setting(s)",
            "  of: the posterior Q that predicts by default, as a stochastic network θ ~ Q (the glm and fast "
            "predictives average the same Q; P is the prior at the strength κ chosen on the data)",
        ]
        if self.taylor_bound is not None:
            lines.append(f"taylor bound: {self.taylor_bound:.4f}  ({self.taylor_kind})")
        return "\n".join(lines)
